"""A PostgreSQL job queue drained by :func:`tasksession.workers.run_worker`.

* ``jobs.py``: the schema, ``enqueue``, and the worker step
  (``SELECT ... FOR UPDATE SKIP LOCKED``, one transaction per job);
* ``__main__.py``: the worker program, ``python -m examples.job_queue URL``
  (``--enqueue N`` adds N jobs first; SIGINT/SIGTERM stop it gracefully);
* ``test_job_queue.py``: workers cancelled mid-job, backends terminated,
  a worker process killed with SIGKILL, and restarts: every job is done
  exactly once.
"""
