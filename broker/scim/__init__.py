"""Pure SCIM knowledge: schemas and reference attributes, the rewriter for documents, filters and PATCH."""
