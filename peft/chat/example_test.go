package chat_test

import (
	"fmt"
	"os"

	"peft/peft/chat"
)

// Format one user turn for generation with SmolLM2's template (tokenizer_config.json's
// chat_template; chat.Load reads it from a model folder).
func Example() {
	src, err := os.ReadFile("testdata/templates/smollm2.jinja")
	if err != nil {
		panic(err)
	}
	tmpl, err := chat.Parse(string(src), map[string]string{"eos_token": "<|im_end|>"})
	if err != nil {
		panic(err)
	}
	conversation := []chat.Message{
		{Role: "user", Content: "What is 2+2?"},
		{Role: "assistant", Content: "4"},
	}
	r, err := tmpl.RenderSpans(conversation, chat.Options{})
	if err != nil {
		panic(err)
	}
	fmt.Print(r.Text)
	for _, s := range r.Assistant {
		fmt.Printf("assistant: %q\n", r.Text[s.Start:s.End])
	}
	// Output:
	// <|im_start|>system
	// You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>
	// <|im_start|>user
	// What is 2+2?<|im_end|>
	// <|im_start|>assistant
	// 4<|im_end|>
	// assistant: "4<|im_end|>"
}
