"""The text markers of the method, in one place (budgets, rewards, data, tokenizer and tests read them).

ARCHITECTURE.md: thinking ends at ``</think>``; a summary prompt appends the truncation mark when
the trace was cut short or never closed, then the answer opener; the reward reads the answer step
that starts with ``**Final Answer**\\n``.
"""

THINK_START = "<think>"
THINK_END = "</think>"
TRUNCATION_MARK = "...\n\n...\n\n</think>"
FINAL_ANSWER_HEADER = "**Final Answer**"
ANSWER_STEP_HEADER = FINAL_ANSWER_HEADER + "\n"
ANSWER_OPENER = "\n\n" + ANSWER_STEP_HEADER
INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."
