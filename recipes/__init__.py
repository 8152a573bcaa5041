"""What a teacher target *is*, as data and pure functions, on the store's layer alone (whose node cache keeps a
weight file's sha256). `teachers/` computes with it, the store records its identity, the trainer checks stores
against it.

    manifest    the teacher manifest schema (TASKS, TeacherSpec, TeacherManifest, identity); manifests/ holds the
                default, ola_vlm.yaml
    imageops    decoding and the PIL ops of the recipes (bit-exact to the original's)
    pil_exact   the same ops in torch, bit-identical, on any device
    preprocess  a recipe's ops on one decoded image, on the CPU or on a device
    weights_files  the content sha256 of a teacher's weight files, read without loading a model (kept in
                the node's cache: store.cache)
"""
