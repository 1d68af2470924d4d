"""Ray job entrypoint. Register the best checkpoint of the sweep/run (the register: section).

    ray job submit --working-dir . -- python jobs/register_model.py --config jobs/configs/imagenet-resnet50.yaml

A thin wrapper over `pipeline run`: the same flags work (--tracking-uri, --experiment, --json).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working_dir

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["run", "--only", "register", *sys.argv[1:]]))
