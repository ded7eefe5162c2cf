"""The two built-in implementations of the training-step kind (:class:`ibcore.protocols.TrainingStep`).

:mod:`~ibcore.engine.steps.standard` trains runs one after another (the reference);
:mod:`~ibcore.engine.steps.fused` trains runs whose step is ``standard`` as one stacked model. Neither
imports the trainer: a step sees runs through :class:`~ibcore.protocols.StepRun` and batches.
"""
