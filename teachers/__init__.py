"""The three OLA-VLM teachers (gen, depth, seg): one module each, a manifest that declares them, a registry.

    from pipeline.teacher_manifest import load_manifest
    from teachers.registry import load_teachers
    teachers = load_teachers(load_manifest(), ["gen", "depth", "seg"], device="cuda", dtype=torch.bfloat16)
"""
