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


# Test tiers. `pytest -m "not slow and not integration" tests` is the fast tier (a few minutes on 2 cores); CI runs all.
# integration: whole modules that drive commands, notebooks or several processes end to end;
# slow: single tests that took 10 s or more on this 2-core machine (durations of a full run, loaded).
INTEGRATION = {"test_cli", "test_ddp", "test_train_notebook", "test_experiment_notebooks", "test_plugins",
               "test_faults_run", "test_real_data", "test_bench", "test_peers", "test_hub"}
SLOW = {"test_every_single_expert_learns", "test_prior_expert_collapse_and_the_warmup_that_prevents_it",
        "test_gpu_check_smoke", "test_wandb_and_mlflow_write_every_epoch_and_the_evaluation",
        "test_loggers_end_their_runs_when_run_returns", "test_mlflow_logger_works_without_the_file_store_opt_in",
        "test_registered_networks_build_for_each_dataset", "test_fid_weights_cache_with_altered_weights_is_not_used",
        "test_compiled_training_matches_eager", "test_two_processes_contend_for_one_folder",
        "test_moved_batches_equal_todays_bitwise", "test_a_run_stopped_mid_epoch_evaluates_what_was_saved",
        "test_the_training_notebook_renders_with_any_metric_subset",
        "test_tensorboard_event_files_hold_step_terms_and_final_metrics"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__ in INTEGRATION: item.add_marker(pytest.mark.integration)
        if item.originalname in SLOW: item.add_marker(pytest.mark.slow)
