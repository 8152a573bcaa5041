"""Benchmarks, a layer on top of olaf's packages (and of support/), never imported by them. Each module is a command
that compares designs side by side in one run and prints a table (ratios; nothing asserts on time):

    python -m benchmarks.<module> --help

    teacher_speed   the teachers' forward: batch sizes, dtypes, per-image loop vs batched
    extract         the extraction: the original's per-image loop vs the Ray job; --shape-true the data path's
                    stages at real target sizes
    bucket          a store on local disk vs on S3 (SeaweedFS on loopback): writes, reads, verify
    loader          the trainer's stream: resume position lookup, DataLoader workers, samples/s
    fp8_targets     PT on fp8-stored targets vs fp16 (loss curves, bytes)
    pt_step         the PT step (trainer.loop.train_step) with stored targets vs teachers inside the step
    vlora_step      VLoRA's PT step beside LLaVA-1.5's and OLA-VLM's (time, saved activations, parameters)
    probing         olaf's one probing pass vs the authors' one job per task
    scale           558K, 3M and 30M samples: planning, the sample index, trainer start-up and memory, resume
    gpu_proof       every GPU figure in one run and one JSON (a package: runner, setup, machine, one module per
                    part, table)
    timing          how every benchmark times a call (warm-up, median, device sync)

Every step they time is the trainer's own (trainer.loop.train_step). docs/benchmarks.md gives the figures;
tests/test_benchmarks.py runs every documented command at a tiny size.
"""
