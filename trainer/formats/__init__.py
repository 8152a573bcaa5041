"""The model folders olaf writes and reads, one module per format: each owns its file and key names, writing the
folder from a PT checkpoint and, where olaf probes it, reading it back into a model to probe.

    common      what every format shares: the checkpoint an export comes from, where it may go, the one-line
                write failure; what a reader returns (Probed) and loads with (the LLM, tower, projector)
    run_export  RUN/export/ (trainer.pt writes it at its end; --format llava): mm_projector.bin, task tokens,
                predictors, config.json; read back for probing, a VLoRA run's too
    ola_vlm     --format ola-vlm: the folder OLA-VLM's IFT continues from, for their pinned transformers 4.41.1;
                read: their released folders (ola_llama, ola_phi3, llava_llama, llava_phi3, probe checkpoints)
    vlora_pt    --format vlora: VLoRA's PT output folder (their finetune reads it; olaf does not)
    llava_hf    read: a transformers LlavaForConditionalGeneration (e.g. llava-hf/llava-1.5-7b-hf)
    detect      which format a folder is, and `read`: any folder olaf writes or probes as a model to probe (the
                one entry: nothing else works out a folder's format)
"""

from trainer.formats.detect import read

__all__ = ["read"]
