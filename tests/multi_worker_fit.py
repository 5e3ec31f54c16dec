"""One worker (or the single-process reference) of test_multi_worker.py.

    python multi_worker_fit.py DATA.npz OUT.npz [TF_CONFIG json]

Trains Input -> tfcells.LSTM (frozen) -> tfcells.GRU -> Dense on DATA.npz's x, y from its
initial weights (SGD, mean squared error), one epoch, global batch GLOBAL_BATCH, in float64:
with a TF_CONFIG under MultiWorkerMirroredStrategy (one CPU replica per worker), else in this
process alone. Writes the weights after the epoch and the kernels' work counters to OUT.npz
(worker 0 only). test_multi_worker.py runs the single-process reference in its own process
(main()).
"""

import json
import os
import sys

GLOBAL_BATCH = 8
COLLECTIVE_TIMEOUT_S = 60


def main(data_path, out_path, tf_config=None):
    if tf_config:
        os.environ["TF_CONFIG"] = tf_config
    import numpy as np
    import tensorflow as tf
    import keras
    import tfcells
    from tfcells.testing import CountWork

    floatx, policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:
        _train(np, tf, keras, tfcells, CountWork, data_path, out_path, tf_config)
    finally:
        keras.config.set_floatx(floatx)
        keras.config.set_dtype_policy(policy)


def _train(np, tf, keras, tfcells, CountWork, data_path, out_path, tf_config):
    data = np.load(data_path)
    x, y = data["x"], data["y"]
    if tf_config:
        # Two workers share this machine's cores: one thread each.
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        strategy = tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=tf.distribute.experimental.CommunicationOptions(
                timeout_seconds=COLLECTIVE_TIMEOUT_S))
        assert strategy.num_replicas_in_sync == 2, strategy.num_replicas_in_sync
    else:
        strategy = tf.distribute.get_strategy()  # the default: this process alone
    with strategy.scope():
        frozen = tfcells.LSTM(5, return_sequences=True, name="frozen")
        trained = tfcells.GRU(4, name="trained")
        model = keras.Sequential([keras.Input(x.shape[1:]), frozen, trained,
                                  keras.layers.Dense(1, name="head")])
        model.set_weights([data[f"w{k}"] for k in range(len(model.weights))])
        frozen.trainable = False
        optimizer = keras.optimizers.SGD(0.1)
        optimizer.build(model.trainable_weights)

    # Keras 3's fit() does not run under MultiWorkerMirroredStrategy (it reduces the batch
    # and the scalar logs with calls that strategy rejects), so this is the custom training
    # loop of TensorFlow's multi-worker guide: each replica's loss is scaled by the global
    # batch, the optimizer all-reduces the gradients.
    @tf.function
    def step(batch_x, batch_y):
        def replica_step(bx, by):
            with tf.GradientTape() as tape:
                per_example = tf.reduce_mean((model(bx, training=True) - by) ** 2, axis=1)
                loss = tf.nn.compute_average_loss(per_example, global_batch_size=GLOBAL_BATCH)
            grads = tape.gradient(loss, model.trainable_weights)
            optimizer.apply_gradients(zip(grads, model.trainable_weights))
        strategy.run(replica_step, args=(batch_x, batch_y))

    # Every worker reads the same global batches; tf.distribute gives each replica its half.
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    with CountWork() as work:
        for batch_x, batch_y in strategy.experimental_distribute_dataset(
                dataset.with_options(options)):
            step(batch_x, batch_y)
    task = json.loads(tf_config)["task"]["index"] if tf_config else 0
    if task == 0:
        np.savez(out_path, **{f"w{k}": w for k, w in enumerate(model.get_weights())},
                 **{f"work_{k}": v for k, v in work.delta.items()})
    print("WORKER-OK", task, flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
