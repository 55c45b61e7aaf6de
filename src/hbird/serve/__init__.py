"""``hbird serve``: interactive in-context segmentation of a folder of images.

:class:`~hbird.serve.workspace.Workspace` holds the state (classes, prompt, predictor);
:func:`~hbird.serve.app.create_app` puts a REST API over it (needs ``hbird[serve]``).
"""
