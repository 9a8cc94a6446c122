"""The DP train step that `model.fit` runs, installed on a model by `make_private`."""

import types

from tfdp_prune import augmult
from tfdp_prune import dp_step
from tfdp_prune import lazy_build
from tfdp_prune import model_checks
from tfdp_prune import optimizer as optimizer_lib
from tfdp_prune.compat import keras
from tfdp_prune.compat import tf

NON_FINITE_METRIC = "dp_non_finite_examples"


def make_private(model: keras.Model) -> keras.Model:
  """Makes `model.fit` (and `train_on_batch`) train `model` with its DP optimizer.

  Call it once, before or after `model.compile(optimizer=<tfdp_prune DP optimizer>,
  loss=<loss with reduction="none">)`. It checks the model (tf_keras, no batch normalization,
  no state written from the batch in training mode: `model_checks`; models without declared
  inputs get that last check when the train step is traced, before their first step),
  replaces the model's train step with one that computes per-example gradients and hands their
  clipped sum to the optimizer, and returns the same model.

  The train step also logs `dp_non_finite_examples` (examples whose gradient was not finite and
  was therefore dropped, summed over the epoch): in `fit`'s logs (History, TensorBoard) and
  `train_on_batch`, never in `evaluate`, whose results and `model.metrics_names` stay what the
  model was compiled with. A model declared without an input shape (`Sequential([Dense(1)])`)
  is built for the shapes of the training data when `fit` (or `train_on_batch`) starts, so that
  callbacks (the mask callbacks) see its weights before the first step. The DP optimizer's
  variables are created before Keras makes the train function, so the first step is traced
  once.
  """
  model_checks.check_dp_model(model)
  with model.distribute_strategy.scope():
    # Held outside Keras' attribute tracking: a tracked metric would be in `model.metrics`,
    # hence in what `evaluate` returns (and logged again as `val_dp_non_finite_examples`).
    model._dp_training_logs = _TrainingOnlyMetrics(  # pylint: disable=protected-access
        keras.metrics.Sum(name=NON_FINITE_METRIC, dtype=tf.int64))
  model.train_step = types.MethodType(dp_train_step, model)
  model.reset_metrics = types.MethodType(_reset_metrics, model)
  model.fit = types.MethodType(_fit_building_lazily, model)
  model.train_on_batch = types.MethodType(_train_on_batch_building_lazily, model)
  model.make_train_function = types.MethodType(_make_train_function, model)
  model.train_function = None  # a train function built before must not be reused
  return model


class _TrainingOnlyMetrics:
  """Metrics the DP train step logs and `evaluate` does not: a plain object, which Keras'
  attribute tracking (of `Metric` attributes, lists and dicts) does not look into."""

  def __init__(self, non_finite_examples):
    self.non_finite_examples = non_finite_examples

  def results(self) -> dict:
    return {NON_FINITE_METRIC: self.non_finite_examples.result()}

  def reset(self) -> None:
    self.non_finite_examples.reset_state()


def _reset_metrics(model) -> None:
  """`Model.reset_metrics`, also for the training-only metrics: Keras calls it where it resets
  its own (each epoch of `fit`, `train_on_batch(reset_metrics=True)`)."""
  type(model).reset_metrics(model)
  model._dp_training_logs.reset()  # pylint: disable=protected-access


def _fit_building_lazily(model, x=None, *args, **kwargs):
  """`Model.fit`, after building a model without input shapes for the shapes of `x`."""
  lazy_build.build_for_data(model, x)
  return type(model).fit(model, x, *args, **kwargs)


def _train_on_batch_building_lazily(model, x=None, *args, **kwargs):
  """`Model.train_on_batch`, after building a model without input shapes for the shapes of `x`
  (then the DP optimizer exists before the step is traced, and it is traced once)."""
  lazy_build.build_for_data(model, x)
  return type(model).train_on_batch(model, x, *args, **kwargs)


def _make_train_function(model, force=False):
  """`Model.make_train_function`, after creating the DP optimizer's variables (eagerly, in the
  model's strategy; `fit` and `train_on_batch` call it there): created while the step is first
  traced, they would make `tf.function` trace the step twice (once creating variables, once
  not), doubling the first step's tracing time. A model without weights yet, or compiled with
  another optimizer, is left to the train step (which builds, or refuses, as it traces)."""
  optimizer = getattr(model, "optimizer", None)
  if optimizer_lib.is_dp_optimizer(optimizer) and model.built and model.trainable_variables:
    with model.distribute_strategy.scope():
      optimizer.build(model.trainable_variables)
  return type(model).make_train_function(model, force=force)


def dp_train_step(model: keras.Model, data) -> dict:
  """One physical batch: the per-example clipped sum (`dp_step` stage 1, with the optimizer's
  `dp_settings`) -> the DP optimizer (stages 2 to 6) -> metrics."""
  optimizer = optimizer_lib.require_dp_optimizer(model, "The DP train step")
  loss_fn = _per_example_loss(model)
  x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
  _check_no_state_written_from_batch(model, x)  # its probe builds a model built lazily
  model_checks.check_full_precision(model)  # now with every weight, before the first update
  rows = tf.shape(tf.nest.flatten(x)[0])[0]
  sample_weight = (tf.ones([rows]) if sample_weight is None
                   else tf.reshape(tf.cast(sample_weight, tf.float32), [rows]))
  variables = model.trainable_variables
  with tf.init_scope():
    optimizer.build(variables)
  engine_output = dp_step.per_example_clipped_sum(
      model, loss_fn, x, y, sample_weight, variables, optimizer.update_masks(variables),
      optimizer.dp_settings)
  optimizer.apply_clipped_sum(engine_output.clipped, variables)
  training_logs = model._dp_training_logs  # pylint: disable=protected-access
  training_logs.non_finite_examples.update_state(engine_output.clipped.num_non_finite)
  # Loss and metrics over the rows that were trained on: Keras' unweighted metrics would count
  # padding, and a row dropped for a non-finite gradient would log loss: nan.
  real = tf.logical_and(tf.not_equal(sample_weight, 0),
                        tf.logical_not(_dropped_rows(engine_output.clipped, rows)))
  x, y, predictions, sample_weight = tf.nest.map_structure(
      lambda t: tf.boolean_mask(t, real), (x, y, engine_output.predictions, sample_weight))
  model.compute_loss(x, y, predictions, sample_weight)  # updates the loss metric
  return dict(model.compute_metrics(x, y, predictions, sample_weight), **training_logs.results())


def _dropped_rows(clipped, rows):
  """[rows] bool: the rows of a clipping unit dropped for a non-finite gradient (a microbatch
  is `rows / num_units` consecutive rows)."""
  if clipped.non_finite is None:
    return tf.zeros([rows], tf.bool)
  return tf.repeat(clipped.non_finite, rows // tf.shape(clipped.non_finite)[0])


def _check_no_state_written_from_batch(model, x) -> None:
  """At trace time, before the first step: the model's training forward pass writes no state
  from batches like `x` (`model_checks.check_no_state_written_from_batch`). Runs eagerly, once,
  in cross-replica context (under tf.distribute, not once per replica)."""
  spec = tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype), x)
  if augmult.has_views(model, x):  # [batch, K, ...]: the model sees [rows, ...]
    spec = tf.nest.map_structure(
        lambda s: tf.TensorSpec(s.shape[:1].concatenate(s.shape[2:]), s.dtype), spec)
  fixed_batch_size = all(s.shape.rank and s.shape[0] is not None
                         for s in tf.nest.flatten(spec))

  def check(*_):
    with tf.init_scope():
      try:
        model_checks.check_no_state_written_from_batch(model, spec, fixed_batch_size)
      except ValueError:
        model.train_function = None  # its trace failed: the next fit must trace afresh
        raise

  context = tf.distribute.get_replica_context()
  if context is None:  # already in cross-replica context
    check()
  else:
    context.merge_call(check)


def _per_example_loss(model):
  """The compiled loss as a function of (y_true, y_pred) returning one value per example."""
  loss = getattr(model, "loss", None)
  if isinstance(loss, (dict, list, tuple)):
    raise ValueError("Expected a single loss for a single-output model; tfdp_prune does not "
                     f"support multi-output losses yet. Received: loss={loss!r}.")
  if loss is None or isinstance(loss, str):
    raise ValueError(
        "Expected a per-example loss: a tf_keras loss object with reduction='none', e.g. "
        "keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction='none'). "
        f"Received: loss={loss!r}. A reduced loss would average examples before clipping.")
  if isinstance(loss, keras.losses.Loss) and loss.reduction != keras.losses.Reduction.NONE:
    raise ValueError(
        f"Expected the loss {type(loss).__name__} to have reduction='none' (one value per "
        f"example, as TF Privacy requires). Received: reduction='{loss.reduction}'. Build it "
        f"with {type(loss).__name__}(..., reduction='none').")
  return loss
