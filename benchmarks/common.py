"""Prompts shared by the benchmarks."""

PROMPTS = [
    "Explain how a refrigerator keeps food cold.",
    "Write a short story about a lighthouse keeper.",
    "What are the main causes of inflation?",
    "Describe the water cycle for a ten-year-old.",
    "Give three tips for writing clean Python code.",
    "Why do cats purr?",
    "Summarize the plot of Romeo and Juliet.",
    "How does a compiler differ from an interpreter?",
    "What is the difference between weather and climate?",
    "How do vaccines train the immune system?",
    "Write a limerick about a forgetful robot.",
    "What is a black hole?",
    "Explain recursion with an example.",
    "Why is the ocean salty?",
    "List the planets of the solar system in order.",
    "What makes a good cup of coffee?",
]
