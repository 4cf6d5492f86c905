"""langchain-openai's ChatOpenAI pointed at berth: invoke and stream."""
import sys

from langchain_openai import ChatOpenAI

base_url, model = sys.argv[1], sys.argv[2]
llm = ChatOpenAI(base_url=base_url, api_key="unused", model=model, temperature=0, max_tokens=16, max_retries=0, timeout=120)
answer = llm.invoke("What is the capital of France?")
assert answer.content, answer
streamed = "".join(chunk.content for chunk in llm.stream("What is the capital of France?"))
assert streamed == answer.content, (streamed, answer.content)
print("langchain: all checks passed")
