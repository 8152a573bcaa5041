"""One command proves olaf on a GPU: every figure the README owes, measured in one run, into one JSON.

    python -m benchmarks.gpu_proof --out DIR [--minutes 8] [--parts teachers,recipes,pipeline,pt,probe]
    python -m benchmarks.gpu_proof --out DIR --tiny      # the same code paths at tiny sizes, on CPU (the suite's)
    make gpu-proof OUT=DIR                               # the same, after `make setup`

Full size means the real architectures with random weights, built from their configs (nothing is downloaded):
ViT-H/14 (gen, float16), DINOv2-L (depth, bfloat16) and OneFormer's Swin-L (seg, bfloat16) as the teachers'
manifest says; a Llama-3-8B-shaped LLM and CLIP ViT-L/14-336 in bfloat16 for PT and probing. The parts, in order:

  teachers  per teacher: GFLOP per image, a batch-size sweep (img/s, TFLOP/s, MFU, peak memory), then at the best
            batch SDPA off, channels_last on and torch.compile on, one at a time; the three together as the
            extraction actor runs them (TeacherSet.run); the original's per-image loop on the same device (decode,
            PIL recipe, batch 1, synchronous) and the ratio
  recipes   the device recipes (recipes/pil_exact.py) on decoded images of crawl-like sizes: ms per image on the
            device against Pillow's CPU ms, and the bit-identity of every result to Pillow's, checked here
  pipeline  the end-to-end Ray job (`python -m pipeline.extract_teachers`) on generated JPEGs with decode
            workers on this node's CPUs (or on --ray-address's cluster): img/s, actor busy fraction, decode CPU ms, the cores the data path used
  pt        one PT step per sample and its peak memory for LLaVA-1.5's PT, OLA-VLM's (released heads, the
            config's gradient checkpointing), VLoRA's (their PT settings) and VLoRA with OLA-VLM's losses; OLA-VLM's
            step with the teachers run inside it (the original's way) against stored targets; the share of the
            step that the task tokens and heads cost; the stream of stored targets against what the step takes
  probe     olaf's one pass (every task, every layer, one MLLM forward) against the authors' one job per task
            (the teacher online per image), a few steps each

Each part gets a share of --minutes (a part that ends early leaves its time to the next) and stops between two
figures when its time is up ("status": "budget", "stopped_before": what it did not measure); an alarm stops a
figure that hangs past it. DIR/gpu_proof.json is rewritten, atomically, after every figure, so a run that is
killed leaves what it measured; SIGTERM and SIGINT also record where they came ("interrupted"). The JSON records
the GPU, driver, CUDA, torch, the libraries and olaf's code version; the table at the end prints the headline
figures. `--tiny` runs every part at tiny sizes on CPU in about a minute: that is what the test suite runs, so
the script a GPU's short lease spends its time in is known to work. On CPU nothing here is a figure to quote.
"""

# The package, one module per job: runner (the record, its clock, the alarm, the signals), setup (what the parts
# measure at, the models built once), machine (the environment, the node's busy cores), a module per part, table
# (the headlines), __main__ (the command).
