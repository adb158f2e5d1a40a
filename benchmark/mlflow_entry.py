"""The model-from-code file MLflow stores with every logged tumorbench model: loading it builds the
Classifier by import, so no pickled Python object is ever deserialised."""
from mlflow.models import set_model

from benchmark.mlflow_model import Classifier

set_model(Classifier())
