import pytest
from ecosystem_helpers import mlflow_uri_restored


@pytest.fixture(autouse=True)
def _restore_mlflow_uri():
    """Tests here point MLflow at their own stores (``--tracking-uri``, explicit tracking_uri); leave
    MLflow reading ``MLFLOW_TRACKING_URI`` again afterwards, as a fresh process does."""
    with mlflow_uri_restored():
        yield
