"""The extraction job, one module per stage (`python -m pipeline.extract_teachers --help` tells the story):

    settings   what the command line gives, the usage error, SIGTERM as Ctrl-C
    cli        arguments, signals, exit statuses
    plan       the dataset validated, split into the store's shards
    preflight  what needs no model: the output, the store to continue, the weights, the work per shard
    resources  Ray, and how the cluster is divided (actors, CPUs, batch, queues, where recipes run)
    decode     the CPU task body: read, decode, (cpu) the recipes' PIL ops; every sample fails alone
    compute    a batch through the teachers and encoded; a shard joined on sample ids
    actors     what Ray runs: the teacher actor, the decode, writer and verify tasks
    scheduler  ShardScheduler: shards in dataset order, leases, back-pressure, retries, commits
    report     progress and the summary
    run        the stages in order
"""
