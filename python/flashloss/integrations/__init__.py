"""Integrations with training libraries (imported on demand: `import flashloss.integrations.trl`)."""
