"""LangChain tools inside an agent loop driven by a scripted fake chat model (no LLM service): the model
asks for a tool with structured arguments, the tool runs our predictor, the result goes back to the
model, and the final answer carries it. Bad arguments and bad files come back as error tool messages."""
from __future__ import annotations

import io

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.utils.function_calling import convert_to_openai_tool
from PIL import Image
from pydantic import Field, ValidationError

from lavis_ext.serve.langchain_tools import (
    ImageCaptionInput,
    ImageCaptionTool,
    VisualQuestionInput,
    VisualQuestionTool,
)


class ScriptedToolCaller(BaseChatModel):
    """A fake tool-calling chat model: emits the planned tool calls one per turn, then a final answer
    quoting every tool result it received (what a real model would do with them)."""

    plan: list[dict]
    bound_tools: list[dict] = Field(default_factory=list)

    @property
    def _llm_type(self) -> str:
        return "scripted-tool-caller"

    def bind_tools(self, tools, **kwargs):
        # what a provider integration sends to its API: the tools' JSON schemas
        return self.model_copy(update={"bound_tools": [convert_to_openai_tool(t) for t in tools]})

    def _generate(self, messages, stop=None, run_manager=None, **kwargs) -> ChatResult:
        results = [m for m in messages if isinstance(m, ToolMessage)]
        if len(results) < len(self.plan):
            step = self.plan[len(results)]
            message = AIMessage(content="", tool_calls=[{**step, "id": f"call_{len(results)}", "type": "tool_call"}])
        else:
            message = AIMessage(content="Final answer: " + " | ".join(m.content for m in results))
        return ChatResult(generations=[ChatGeneration(message=message)])


def run_agent(model, tools, request: str, max_turns: int = 6):
    """The minimal tool-calling loop (what LangGraph's prebuilt agent does): call the model, run the tools
    it asks for, feed back the results, stop at the first answer without tool calls."""
    model = model.bind_tools(tools)
    by_name = {tool.name: tool for tool in tools}
    messages = [HumanMessage(request)]
    for _ in range(max_turns):
        reply = model.invoke(messages)
        messages.append(reply)
        if not reply.tool_calls:
            return reply.content, messages
        for call in reply.tool_calls:
            messages.append(by_name[call["name"]].invoke(call))
    raise AssertionError("the agent did not finish")


@pytest.fixture(scope="module")
def predictors(trained_caption_run, trained_vqa_run):
    from lavis_ext.inference import load

    return load(trained_caption_run, device="cpu"), load(trained_vqa_run, device="cpu")


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    from lavis_ext.datasets.synthetic import make_example

    path = tmp_path_factory.mktemp("images") / "scene.png"
    Image.open(io.BytesIO(make_example(0, "test", 1)["jpg"])).convert("RGB").save(path)
    return path


def test_agent_captions_and_answers_with_our_tools(predictors, image_file):
    captioner, answerer = predictors
    tools = [ImageCaptionTool(predictor=captioner), VisualQuestionTool(predictor=answerer)]
    question = "how many shapes are there?"
    model = ScriptedToolCaller(plan=[
        {"name": "image_caption", "args": {"image_path": str(image_file)}},
        {"name": "visual_question_answering", "args": {"image_path": str(image_file), "question": question,
                                                       "num_beams": 2}},
    ])
    final, messages = run_agent(model, tools, f"Describe {image_file} and count its shapes.")
    image = Image.open(image_file).convert("RGB")
    caption = captioner.caption([image])[0].strip()
    answer = answerer.answer([image], [question], decoding=answerer.answer_decoding.with_options(num_beams=2))[0].strip()
    results = [m for m in messages if isinstance(m, ToolMessage)]
    assert [m.content for m in results] == [caption, answer]
    assert all(m.status == "success" for m in results)
    assert [m.tool_call_id for m in results] == ["call_0", "call_1"]
    assert final == f"Final answer: {caption} | {answer}"


def test_tool_schemas_are_typed_not_strings(predictors):
    captioner, answerer = predictors
    schema = convert_to_openai_tool(VisualQuestionTool(predictor=answerer))["function"]
    props = schema["parameters"]["properties"]
    assert schema["name"] == "visual_question_answering"
    assert set(schema["parameters"]["required"]) == {"image_path", "question"}
    assert props["image_path"]["type"] == "string" and props["question"]["type"] == "string"
    assert props["num_beams"]["anyOf"][0] == {"type": "integer", "minimum": 1, "maximum": 10}
    caption_schema = convert_to_openai_tool(ImageCaptionTool(predictor=captioner))["function"]
    assert set(caption_schema["parameters"]["required"]) == {"image_path"}


@pytest.mark.parametrize("schema, args, bad_field", [
    (VisualQuestionInput, {"image_path": "a.png"}, "question"),
    (VisualQuestionInput, {"image_path": "a.png", "question": ""}, "question"),
    (ImageCaptionInput, {"image_path": "a.png", "num_beams": 50}, "num_beams"),
    (ImageCaptionInput, {"image_path": "a.png", "max_new_tokens": 0}, "max_new_tokens"),
    (ImageCaptionInput, {"input": "a.png|what is it?"}, "image_path"),
])
def test_schemas_reject_bad_input(schema, args, bad_field):
    with pytest.raises(ValidationError) as info:
        schema.model_validate(args)
    assert bad_field in {str(e["loc"][0]) for e in info.value.errors()}


def test_bad_arguments_and_files_come_back_as_tool_errors(predictors, image_file, tmp_path):
    captioner, answerer = predictors
    not_image = tmp_path / "notes.png"
    not_image.write_text("shopping list: eggs")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    tools = [ImageCaptionTool(predictor=captioner), VisualQuestionTool(predictor=answerer, allowed_dir=image_file.parent)]
    model = ScriptedToolCaller(plan=[
        {"name": "image_caption", "args": {"image_path": str(tmp_path / "missing.png")}},
        {"name": "image_caption", "args": {"image_path": str(not_image)}},
        {"name": "image_caption", "args": {"image_path": str(empty)}},
        {"name": "image_caption", "args": {"image_path": str(image_file), "num_beams": 50}},
        {"name": "visual_question_answering", "args": {"image_path": str(not_image), "question": "what is it?"}},
    ])
    final, messages = run_agent(model, tools, "try these", max_turns=8)
    results = [m for m in messages if isinstance(m, ToolMessage)]
    assert all(m.status == "error" for m in results)
    assert "does not exist" in results[0].content
    assert "not a recognised image" in results[1].content
    assert "is empty (0 bytes)" in results[2].content
    assert "invalid tool arguments: num_beams" in results[3].content and "10" in results[3].content
    assert "outside the allowed directory" in results[4].content
    assert final.startswith("Final answer: ") and "does not exist" in final
