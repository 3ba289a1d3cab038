# Tracking and versioning hooks (logic in src/zipasr/track; see docs/tracking.md).
# MLflow: the resolved tracking spec reaches `zipasr train` / `zipasr track-results` through the
# ZIPASR_TRACKING environment variable, not params or shell arguments, so tracking settings
# never rerun a stage. DVC: after a successful run in a DVC repository, `zipasr dvc-commit`
# records the outputs in dvc.lock and pushes them.
from zipasr.track.spec import ENV as TRACKING_ENV, spec_from_config

_tracking = spec_from_config(config)
if _tracking.enabled:
    os.environ[TRACKING_ENV] = _tracking.to_env()
else:
    os.environ.pop(TRACKING_ENV, None)


onsuccess:
    if config.get("tracking", {}).get("dvc_push", True) and Path(".dvc").is_dir() \
            and Path("dvc.yaml").is_file():
        # a failed push is only a warning of dvc-commit's (it names the remote and the command
        # that pushes later); a failed commit leaves the outputs unversioned
        shell("zipasr dvc-commit || echo 'zipasr: dvc commit failed (the run itself "
              "succeeded, its outputs are not versioned): see above, then rerun `zipasr "
              "dvc-commit`' >&2")
