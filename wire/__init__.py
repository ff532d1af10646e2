"""The wire contract both Flower apps import: how a step travels in a Flower Message."""
