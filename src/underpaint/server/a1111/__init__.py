"""AUTOMATIC1111 1.10's ``/sdapi/v1`` API (and the ControlNet extension's routes): wire models and routes."""
