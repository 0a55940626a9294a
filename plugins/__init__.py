"""Built-in method plugins (installed as `peftsurgery_plugins`; each registered by an entry point)."""
