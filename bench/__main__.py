"""``python -m bench {demo,train,fork,s3,storage,corruption,spike,rollout,save_restore,frameworks,distributed}``: the demo, the reference workload runner and benchmarks."""

from __future__ import annotations

import argparse

from bench import corruption, demo, distributed, fork, frameworks, rollout, s3, save_restore, spike, storage, train


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo.add_arguments(commands.add_parser("demo", help="train, commit every step, restore bit-exactly, report storage"))
    train.add_arguments(commands.add_parser("train", help="run the reference workload against a repository"))
    fork.add_arguments(commands.add_parser("fork", help="benchmark: fork latency and bytes, GC space recovery"))
    s3.add_arguments(commands.add_parser("s3", help="benchmark: commits to S3 vs local vs torch.save + upload"))
    storage.add_arguments(commands.add_parser("storage", help="benchmark: bytes and save/restore time vs torch.save, safetensors, dcp"))
    corruption.add_arguments(commands.add_parser("corruption", help="damage one file at a time: no silent wrong restore, no loss after GC"))
    spike.add_arguments(commands.add_parser("spike", help="benchmark: recovering from injected instability, five methods"))
    rollout.add_arguments(commands.add_parser("rollout", help="benchmark: K futures sequential vs batched, the scheduler's pick"))
    save_restore.add_arguments(commands.add_parser("save_restore", help="benchmark: training stall, throughput, restore paths"))
    frameworks.add_arguments(commands.add_parser("frameworks", help="benchmark: the HF Trainer and Lightning integrations vs their own checkpoints"))
    distributed.add_arguments(commands.add_parser("distributed", help="benchmark: 2 FSDP2 ranks, dcp.save onto qckpt vs DCP's FileSystemWriter"))
    args = parser.parse_args()
    {"demo": demo.run, "train": train.run, "fork": fork.run, "s3": s3.run, "storage": storage.run, "corruption": corruption.run, "spike": spike.run, "rollout": rollout.run,
     "save_restore": save_restore.run, "frameworks": frameworks.run, "distributed": distributed.run}[args.command](args)


if __name__ == "__main__":
    main()
