"""Prefect flows of the pipeline: one flow per stage (:mod:`flows.stages`), the whole
pipeline as one flow of subflows (:mod:`flows.pipeline`), ``ddps predict`` as a flow
(:mod:`flows.predict`), ``make run`` (:mod:`flows.run`) and the deployments' set-up
(:mod:`flows.deploy`). Flows only orchestrate: every stage's work is
its one implementation in ``ddps_core`` (:mod:`ddps_core.stages`).

``python -m flows STAGE`` runs one stage's flow: it is the ``cmd`` of every DVC stage.
"""
