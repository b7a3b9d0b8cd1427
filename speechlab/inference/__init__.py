"""Using a loaded model: transcription (:class:`~speechlab.inference.transcriber.Transcriber`), layer-wise features
written to disk (:mod:`~speechlab.inference.feature_files`), and the round-trip check that compares a written model
with its source (:mod:`~speechlab.inference.round_trip`). Above ``models`` and ``checkpoints``, below the commands;
:mod:`speechlab.api` re-exports what users call.
"""
