"""The lean trainer: OLA-VLM's and VLoRA's PT stages (and probing) from a store; it never imports teachers/.

    errors      TrainerError: what a user can fix, printed as one line
    fields      JSON files users hand in (configs of exports and model folders), every field checked
    config      PTConfig: defaults (configs/*.yaml), YAML overrides, --set, one message for every bad field
    templates   chat templates (and VLoRA's plain text); a record -> prefix, text ids and labels
    data        image recipe of the base encoder, one sample -> a row, collate, workers that die with the trainer
    towers      the frozen base encoders (CLIP-ViT, CLIP-ConvNeXT-XXL) behind one interface
    sequence    the sequence model PT and probing share: [prefix | image | task tokens | text] -> the LLM
    heads       the embedding predictor (Perceiver resampler); with learned latents, the probe head
    vlora       VLoRA's connector: the weights generator and its per-sample deltas in the LLM's layers
    model       OLAPT: the sequence model (projector or VLoRA) + predictors; forward returns the PT loss
    loss        NTP, smooth-L1, InfoNCE over the step's global batch
    build       a run's parts from its config: store check, frozen models, model, stream, optimizer, schedule
    loop        the training loop (PT and probing), distributed set-up, the one-line CLI errors
    checkpoint  the checkpointer over a run's stateful parts
    runlog      logs, counts, the log-time reduction
    export      the command that writes what a run leaves for the next stage (--format ola-vlm, llava, vlora)
    formats/    one module per model folder format, which writes it and reads it back (run_export, ola_vlm for
                the authors' pinned transformers 4.41.1, vlora_pt, llava_hf)
    pt, probe   the commands; plot the loss curves; tiny the random-weight stand-ins
"""
