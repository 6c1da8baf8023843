"""Data: shards from a config to batches.

    shard_format.py         the format: manifest name and schema, member names, Shard, ShardSet
    shard_writer.py, sources.py  writing shards (make-shards) from digits, synthetic images, folders
    datasets.py             a run's train and val shard sets, resolved from the config and checked
    resolve.py              a data spec -> shards with sample counts, checked (datasets.py builds a run's)
    tar_index.py            a tar shard's samples by offset, from its headers
    labels.py               a sample's label (or, multi-label, its labels), read and checked
    order.py                the training order: a pure function of (seed, epoch, position)
    sampling.py             data.sampling: the samples a sampled epoch draws, by class
    eval_split.py           the evaluation split: every sample once across ranks and workers
    pipeline.py             TrainStream / TrainLoader for training; EvalStream for eval and predict
    random_access.py        one sample read by offset; transforms.py: the image transforms
    remote.py               https:// and s3:// objects (fsspec), retried with backoff
    shard_cache.py          the node-local, bounded cache remote shards are read from
    prefetch.py             which shards a node reads when; the thread that fetches them ahead
    sample_index.py         the node's memory-mapped index of every training sample's byte span
    workers.py              the DataLoader workers' fork server (worker_server.py when exec'd)
    damage.py               what data.on_error=skip left out, summed over ranks
"""
