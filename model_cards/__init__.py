"""Model card templates (package data ``hfcompress.model_cards``), rendered by hfcompress.hub."""
