"""Train with a LAVIS project file: python train.py --cfg-path projects/tiny/caption_opt.yaml [--options k=v ...]
Distributed: python -m torch.distributed.run --nproc_per_node=N train.py --cfg-path ..."""
from lavis_ext import cli

if __name__ == "__main__":
    cli.train()
    cli.ext_dist.shutdown()
