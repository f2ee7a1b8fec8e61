"""Domain experts: a registry of named experts (a domain's documents, adapter, prompt and rules), the
two-layer router that picks experts per query, the policy expert for sensitive queries, and the fusion of
several experts' answers. Sits beside `gate` (both decide something per query); the pipeline uses both."""
