"""Procedures (one module each) and the shared mechanisms they compose.

Kept free of imports: the registry of procedures (`workflows.registry`) imports the
activities, and nothing below `workflows` imports it (activities share only `inventory`
and `errors` with it).
"""
