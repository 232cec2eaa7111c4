"""The recipe's ingredients a run composes: optimisers and schedules, weight averaging (lookahead, EMA), batch mixing."""
