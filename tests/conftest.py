"""Shared fixtures: one small offline MNIST-SVHN-Text cache per test session, in a temporary folder."""
import pytest

# the setting of the end-to-end tests: one short epoch on 4,000 pairs (32 steps of 128), evaluation on 500 test pairs
SHORT = dict(dataset="mnist_svhn_text", epochs=1, num_train=4000, num_test=500, classifier_epochs=1, loglik_samples=3,
             eval_max_test=500, loglik_max_test=50, device="cpu", seed=0)
TINY = dict(dataset="mnist_svhn_text", epochs=1, batch_size=32, num_train=96, num_test=32, classifier_epochs=1,
            loglik_samples=2, loglik_max_test=16, device="cpu", seed=1)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    "Dataset and classifier caches shared by every test of the session (built on first use)."
    return tmp_path_factory.mktemp("data")
