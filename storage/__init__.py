"""vmvault storage: the content-addressed backup repository and its backends."""
