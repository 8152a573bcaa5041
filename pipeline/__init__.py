"""On top of recipes, teachers and the store: datasets in, stores out, and the tools around them.

    llava             the LLaVA-Pretrain dataset format; any image folder or COCO caption file as one
    sample            a small dataset in that format, with broken and awkward images mixed in
    extract/          the extraction job, one module per stage (extract_teachers is its command)
    inspect, render   see, verify and picture what a store holds
    jobdir            the allow-list a Ray job is submitted with
    localray          a Ray head on 127.0.0.1, stopped without touching any other Ray
    inputs            where samples come from: a LLaVA JSON, a JSONL listing, WebDataset tars (local or s3://)
    provenance        the code and library versions a store records
"""
