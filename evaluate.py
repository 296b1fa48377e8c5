"""Evaluate with a LAVIS project file: python evaluate.py --cfg-path ... --checkpoint RUN_DIR_OR_CKPT [--options ...]"""
from lavis_ext import cli

if __name__ == "__main__":
    cli.evaluate()
    cli.ext_dist.shutdown()
