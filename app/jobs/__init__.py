"""The job queue's lower layer: the SQLite job store and the backends that run queued jobs.

It sits below app.service and imports only the standard library, app.errors, app.config and app.video (its
process check); app.jobqueue,
above the service, joins the two (it turns a stored job into a GenerationRequest and back).
"""
