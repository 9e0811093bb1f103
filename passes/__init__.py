"""Rewrite passes, one per module. Each defines a frozen dataclass subclass of rewriter.pass_base.Pass;
the registry finds them by their `name`. Passes import `rewriter` only — never another pass or `codegen`."""
