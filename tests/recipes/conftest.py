import pytest


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One data cache (tokenizer, packed data, cached parents) for the recipe tests of a session."""
    return tmp_path_factory.mktemp("kvlab-cache")
