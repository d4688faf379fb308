"""Procedures (one module each) and the shared mechanisms they compose.

Kept free of imports: activities import `workflows.inventory`, and the registry of
procedures (`workflows.registry`) imports the activities.
"""
