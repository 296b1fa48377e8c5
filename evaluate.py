"""Evaluate with a LAVIS project file: python evaluate.py --cfg-path ... --options model.load_finetuned=True model.finetuned=CKPT"""
from lavis_ext import cli

if __name__ == "__main__":
    cli.evaluate()
    cli.ext_dist.shutdown()
