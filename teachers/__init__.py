"""The three OLA-VLM teachers, on recipes: one module each (gen, depth, seg), what they share (base), loading their
weights (weights), which adapter computes which architecture (registry), shape-true stand-ins (standin) and tiny
random-weight ones (tiny).

    from recipes.manifest import load_manifest
    from teachers.registry import TeacherSet
    teachers = TeacherSet.load(load_manifest(), ["gen", "depth", "seg"], device="cuda", dtype=torch.bfloat16)
"""
