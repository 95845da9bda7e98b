package main

import (
	"context"
	"encoding/json"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"peft/peft/chat"
	"peft/peft/generate"
	"peft/peft/llama"
	"peft/peft/stories260k"
)

const storyPrompt = "Once upon a time"

// greedy is a greedy request of n tokens.
func greedy(model string, n int, fields map[string]any) map[string]any {
	body := map[string]any{"model": model, "max_tokens": n, "temperature": 0}
	for k, v := range fields {
		body[k] = v
	}
	return body
}

// GET /v1/models lists the base and the adapters in OpenAI's list shape; /healthz answers.
func TestModelsAndHealth(t *testing.T) {
	eng, text := fixture(t)
	r := start(t, eng, text, DefaultConfig())
	resp, err := r.client.Get(r.url + "/v1/models")
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	var list struct {
		Object string       `json:"object"`
		Data   []modelEntry `json:"data"`
	}
	require.NoError(t, json.NewDecoder(resp.Body).Decode(&list))
	require.Equal(t, "list", list.Object)
	var ids []string
	for _, m := range list.Data {
		ids = append(ids, m.ID)
		require.Equal(t, "model", m.Object)
		require.Positive(t, m.Created)
	}
	require.Equal(t, []string{baseName, loraA, loraB, promptTune}, ids)
	require.Empty(t, list.Data[0].Parent)
	require.Equal(t, baseName, list.Data[1].Parent)

	health, err := r.client.Get(r.url + "/healthz")
	require.NoError(t, err)
	defer health.Body.Close()
	require.Equal(t, http.StatusOK, health.StatusCode)
}

// The base model's greedy completion is the golden one examples/generate checks (golden.json's
// continuation), with OpenAI's fields and token counts.
func TestCompletionGolden(t *testing.T) {
	eng, text := fixture(t)
	r := start(t, eng, text, DefaultConfig())
	c := r.complete(t, "/v1/completions", greedy(baseName, 16, map[string]any{"prompt": storyPrompt}))
	require.Equal(t, ", there was a little girl named Lily. She loved to play", c.text())
	require.Equal(t, "text_completion", c.Object)
	require.True(t, strings.HasPrefix(c.ID, "cmpl-"), c.ID)
	require.Equal(t, baseName, c.Model)
	require.Positive(t, c.Created)
	require.Equal(t, "length", *c.Choices[0].FinishReason)
	require.Equal(t, &usage{PromptTokens: 5, CompletionTokens: 16, TotalTokens: 21}, c.Usage)
}

// The model field picks the adapter: each of the four names gives its own greedy text, equal to
// one generate.Generate call on that model (so stepping the generation changes nothing), and a
// chat gives each its own reply too.
func TestModelPicksAdapter(t *testing.T) {
	eng, text := fixture(t)
	r := start(t, eng, text, DefaultConfig())
	prompt, err := text.encode(storyPrompt)
	require.NoError(t, err)
	texts := map[string]string{}
	replies := map[string]string{}
	for _, name := range eng.models() {
		c := r.complete(t, "/v1/completions", greedy(name, 12, map[string]any{"prompt": storyPrompt}))
		require.Equal(t, name, c.Model)
		ids, err := generate.Generate(aloneModel(t, name), prompt, generate.Config{MaxNewTokens: 12, StopIDs: text.stopIDs})
		require.NoError(t, err)
		require.Equal(t, text.continuation(text.decode(prompt), prompt, ids), c.text(), name)
		texts[name] = c.text()
		t.Logf("%-12s %q", name, c.text())

		msgs := []chat.Message{{Role: "user", Content: "Tell me a story."}}
		chatted := r.complete(t, "/v1/chat/completions", greedy(name, 8, map[string]any{"messages": msgs}))
		replies[name] = chatted.text()
	}
	for _, other := range []string{loraA, loraB, promptTune} {
		require.NotEqual(t, texts[baseName], texts[other], "%s gives the base's text", other)
		require.NotEqual(t, replies[baseName], replies[other], "%s gives the base's chat reply", other)
	}
	require.NotEqual(t, texts[loraA], texts[loraB])
}

// A chat is rendered with the template (stories260K has none: the plain one, after <s>) and
// answered in OpenAI's chat shape with the ids of generating from that prompt.
func TestChatCompletion(t *testing.T) {
	eng, text := fixture(t)
	require.True(t, text.builtinTemplate)
	r := start(t, eng, text, DefaultConfig())
	msgs := []chat.Message{{Role: "system", Content: "You tell stories."}, {Role: "user", Content: "Tell me one about a cat."}}
	c := r.complete(t, "/v1/chat/completions", greedy(loraA, 10, map[string]any{"messages": msgs}))
	require.Equal(t, "chat.completion", c.Object)
	require.True(t, strings.HasPrefix(c.ID, "chatcmpl-"), c.ID)
	require.Equal(t, "assistant", c.Choices[0].Message.Role)

	rendered, err := text.template.Render(msgs, chat.Options{AddGenerationPrompt: true})
	require.NoError(t, err)
	require.Equal(t, "<s>system: You tell stories.\nuser: Tell me one about a cat.\nassistant:", rendered)
	prompt := text.tok.EncodeNoSpecial(rendered)
	require.Equal(t, 1, prompt[0], "the template's <s> is the BOS id")
	ids, err := generate.Generate(aloneModel(t, loraA), prompt, generate.Config{MaxNewTokens: 10, StopIDs: text.chatStopIDs})
	require.NoError(t, err)
	require.Equal(t, text.continuation(text.decode(prompt), prompt, ids), c.text())
	require.Equal(t, len(prompt), c.Usage.PromptTokens)
	require.Equal(t, len(ids), c.Usage.CompletionTokens)
}

// A model folder with its own chat template is rendered with it, and generation also stops at
// the template's eos_token.
func TestModelChatTemplate(t *testing.T) {
	_, base := fixture(t)
	dir := t.TempDir()
	const source = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}[assistant]"
	config := `{"eos_token": "<unk>", "bos_token": "<s>", "chat_template": ` + string(must(json.Marshal(source))) + `}`
	require.NoError(t, os.WriteFile(filepath.Join(dir, "tokenizer_config.json"), []byte(config), 0o644))
	tok, err := fs.ReadFile(stories260k.FS(), "tokenizer.json")
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(dir, "tokenizer.json"), tok, 0o644))
	text, err := loadText(os.DirFS(dir), dir, llama.Config{VocabSize: 512, EOSTokenIDs: llama.TokenIDs{2}})
	require.NoError(t, err)
	require.False(t, text.builtinTemplate)
	ids, err := text.encodeChat([]chat.Message{{Role: "user", Content: "Hi"}})
	require.NoError(t, err)
	require.Equal(t, base.tok.EncodeNoSpecial("[user] Hi<unk>[assistant]"), ids)
	require.Equal(t, []int{2}, base.stopIDs)
	require.Equal(t, []int{2, 0}, text.chatStopIDs, "</s> and the template's eos_token <unk>")
}

// Streamed text, concatenated, is the non-streamed text for greedy decoding: completions and
// chats, base and adapters, with and without a stop string; with include_usage a last chunk
// without choices counts the tokens.
func TestStreamingMatches(t *testing.T) {
	eng, text := fixture(t)
	r := start(t, eng, text, DefaultConfig())
	msgs := []chat.Message{{Role: "user", Content: "Once upon a time"}}
	cases := []struct {
		path, model string
		fields      map[string]any
	}{
		{"/v1/completions", baseName, map[string]any{"prompt": storyPrompt}},
		{"/v1/completions", loraB, map[string]any{"prompt": "The cat"}},
		{"/v1/completions", promptTune, map[string]any{"prompt": storyPrompt}},
		{"/v1/completions", baseName, map[string]any{"prompt": storyPrompt, "stop": []string{"girl", "Lily"}}},
		{"/v1/chat/completions", baseName, map[string]any{"messages": msgs}},
		{"/v1/chat/completions", loraA, map[string]any{"messages": msgs, "stream_options": map[string]any{"include_usage": true}}},
	}
	for _, tc := range cases {
		t.Run(tc.model+tc.path, func(t *testing.T) {
			body := greedy(tc.model, 16, tc.fields)
			whole := r.complete(t, tc.path, body)
			chunks := r.stream(t, tc.path, body)
			got, reason := streamedText(t, chunks)
			require.Equal(t, whole.text(), got)
			require.Equal(t, *whole.Choices[0].FinishReason, reason)
			require.Greater(t, len(chunks), 3, "one chunk per piece of text")
			object := "text_completion"
			if strings.Contains(tc.path, "chat") {
				object = "chat.completion.chunk"
				require.Equal(t, "assistant", chunks[0].Choices[0].Delta.Role)
			}
			for _, c := range chunks {
				require.Equal(t, object, c.Object)
				require.Equal(t, chunks[0].ID, c.ID)
				require.Equal(t, tc.model, c.Model)
			}
			if _, ok := tc.fields["stream_options"]; ok {
				last := chunks[len(chunks)-1]
				require.Empty(t, last.Choices)
				require.Equal(t, whole.Usage, last.Usage)
			}
		})
	}
}

// A stop string ends the text before it (finish_reason "stop"), the earliest of several;
// OpenAI's single-string form works too.
func TestStopStrings(t *testing.T) {
	eng, text := fixture(t)
	r := start(t, eng, text, DefaultConfig())
	for _, stop := range []any{"little", []string{"Lily", "little"}, []string{"nowhere"}} {
		c := r.complete(t, "/v1/completions", greedy(baseName, 16, map[string]any{"prompt": storyPrompt, "stop": stop}))
		if s, ok := stop.([]string); ok && s[0] == "nowhere" {
			require.Equal(t, ", there was a little girl named Lily. She loved to play", c.text())
			require.Equal(t, "length", *c.Choices[0].FinishReason)
			continue
		}
		require.Equal(t, ", there was a ", c.text(), "stop %v", stop)
		require.Equal(t, "stop", *c.Choices[0].FinishReason)
		require.Less(t, c.Usage.CompletionTokens, 16)
	}
}

// Sampling is reproducible with a seed, and another seed draws other text.
func TestSamplingSeed(t *testing.T) {
	eng, text := fixture(t)
	r := start(t, eng, text, DefaultConfig())
	body := func(seed int) map[string]any {
		return map[string]any{"model": loraA, "prompt": storyPrompt, "max_tokens": 16, "temperature": 1.5, "top_p": 0.95, "seed": seed}
	}
	first := r.complete(t, "/v1/completions", body(7)).text()
	require.Equal(t, first, r.complete(t, "/v1/completions", body(7)).text())
	others := 0
	for seed := 8; seed < 11; seed++ {
		if r.complete(t, "/v1/completions", body(seed)).text() != first {
			others++
		}
	}
	require.Positive(t, others, "three other seeds all drew seed 7's text")
}

// Every bad request is OpenAI's error shape with the right status, naming the field or the
// served models.
func TestErrors(t *testing.T) {
	eng, text := fixture(t)
	cfg := DefaultConfig()
	cfg.MaxBodyBytes = 4096
	cfg.MaxTokens = 64
	r := start(t, eng, text, cfg)
	long := strings.Repeat("once upon a time ", 200) // ~800 tokens: more than the 512 positions
	msgs := []chat.Message{{Role: "user", Content: "hi"}}
	cases := []struct {
		name, method, path string
		body               any
		status             int
		param, code, msg   string
	}{
		{"bad JSON", "POST", "/v1/completions", `{"model": `, 400, "", "invalid_json", "not a JSON request"},
		{"two values", "POST", "/v1/completions", `{} {}`, 400, "", "invalid_json", "more than one JSON value"},
		{"prompt a number", "POST", "/v1/completions", `{"model": "lora-a", "prompt": 5}`, 400, "prompt", "invalid_value", "must be a JSON string"},
		{"max_tokens a string", "POST", "/v1/completions", `{"model": "lora-a", "prompt": "a", "max_tokens": "8"}`, 400, "max_tokens", "invalid_value", "must be a JSON number"},
		{"no prompt", "POST", "/v1/completions", map[string]any{"model": loraA}, 400, "prompt", "invalid_value", "is required"},
		{"no model", "POST", "/v1/completions", map[string]any{"prompt": "a"}, 400, "model", "invalid_value", "stories260K, lora-a, lora-b, prompt"},
		{"max_tokens 0", "POST", "/v1/completions", map[string]any{"model": loraA, "prompt": "a", "max_tokens": 0}, 400, "max_tokens", "invalid_value", "must be in [1, 64], got 0"},
		{"max_tokens over the ceiling", "POST", "/v1/completions", map[string]any{"model": loraA, "prompt": "a", "max_tokens": 65}, 400, "max_tokens", "invalid_value", "got 65"},
		{"temperature 3", "POST", "/v1/completions", map[string]any{"model": loraA, "prompt": "a", "temperature": 3}, 400, "temperature", "invalid_value", "[0, 2]"},
		{"top_p 0", "POST", "/v1/completions", map[string]any{"model": loraA, "prompt": "a", "top_p": 0}, 400, "top_p", "invalid_value", "(0, 1]"},
		{"stop a number", "POST", "/v1/completions", map[string]any{"model": loraA, "prompt": "a", "stop": 3}, 400, "stop", "invalid_value", "a string or a list"},
		{"five stops", "POST", "/v1/completions", map[string]any{"model": loraA, "prompt": "a", "stop": []string{"a", "b", "c", "d", "e"}}, 400, "stop", "invalid_value", "at most 4"},
		{"n 2", "POST", "/v1/completions", map[string]any{"model": loraA, "prompt": "a", "n": 2}, 400, "n", "invalid_value", "only 1"},
		{"prompt too long", "POST", "/v1/completions", map[string]any{"model": baseName, "prompt": long}, 400, "prompt", "context_length_exceeded", "at most 512 tokens"},
		{"prompt and max_tokens too long", "POST", "/v1/completions", map[string]any{"model": promptTune, "prompt": strings.Repeat("once upon a time ", 90), "max_tokens": 64},
			400, "max_tokens", "context_length_exceeded", "more than the 492 tokens model prompt takes"},
		{"no messages", "POST", "/v1/chat/completions", map[string]any{"model": loraA}, 400, "messages", "invalid_value", "is required"},
		{"no role", "POST", "/v1/chat/completions", map[string]any{"model": loraA, "messages": []map[string]string{{"content": "hi"}}}, 400, "messages[0].role", "invalid_value", `must be one of system, developer, user, assistant, tool, got ""`},
		{"unknown role", "POST", "/v1/chat/completions", map[string]any{"model": loraA, "messages": []map[string]string{{"role": "x", "content": "hi"}}}, 400, "messages[0].role", "invalid_value", `got "x"`},
		{"content a list", "POST", "/v1/chat/completions", `{"model": "lora-a", "messages": [{"role": "user", "content": [1]}]}`, 400, "messages.content", "invalid_value", "must be a JSON string"},
		{"unknown model", "POST", "/v1/completions", map[string]any{"model": "gpt-4", "prompt": "a"}, 404, "model", "model_not_found", `"gpt-4" is not served; the models are stories260K, lora-a, lora-b, prompt`},
		{"unknown chat model", "POST", "/v1/chat/completions", map[string]any{"model": "nope", "messages": msgs}, 404, "model", "model_not_found", "the models are"},
		{"unknown path", "GET", "/v1/engines", nil, 404, "", "not_found", "no such endpoint /v1/engines"},
		{"GET completions", "GET", "/v1/completions", nil, 405, "", "method_not_allowed", "takes POST, not GET"},
		{"POST models", "POST", "/v1/models", "{}", 405, "", "method_not_allowed", "takes GET, not POST"},
		{"too large", "POST", "/v1/completions", map[string]any{"model": loraA, "prompt": strings.Repeat("a", 5000)}, 413, "", "request_too_large", "larger than 4096 bytes"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var body *strings.Reader
			if tc.body != nil {
				body = strings.NewReader(string(encode(t, tc.body)))
			} else {
				body = strings.NewReader("")
			}
			req, err := http.NewRequest(tc.method, r.url+tc.path, body)
			require.NoError(t, err)
			resp, err := r.client.Do(req)
			require.NoError(t, err)
			defer resp.Body.Close()
			require.Equal(t, tc.status, resp.StatusCode)
			require.Equal(t, "application/json", resp.Header.Get("Content-Type"))
			var e apiErrorBody
			require.NoError(t, json.NewDecoder(resp.Body).Decode(&e))
			require.Contains(t, e.Error.Message, tc.msg)
			wantType := "invalid_request_error"
			require.Equal(t, wantType, e.Error.Type)
			if tc.param == "" {
				require.Nil(t, e.Error.Param)
			} else {
				require.NotNil(t, e.Error.Param)
				require.Equal(t, tc.param, *e.Error.Param)
			}
			require.NotNil(t, e.Error.Code)
			require.Equal(t, tc.code, *e.Error.Code)
			if tc.status == 405 {
				require.Equal(t, map[bool]string{true: "POST", false: "GET"}[tc.path != "/v1/models"], resp.Header.Get("Allow"))
			}
		})
	}
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

// Validate names the field out of range.
func TestConfigValidate(t *testing.T) {
	require.NoError(t, DefaultConfig().Validate())
	cases := []struct {
		edit func(*Config)
		want string
	}{
		{func(c *Config) { c.MaxBodyBytes = 0 }, "MaxBodyBytes must be > 0"},
		{func(c *Config) { c.MaxTokens = -1 }, "MaxTokens must be > 0"},
		{func(c *Config) { c.DefaultMaxTokens = 300 }, "DefaultMaxTokens must be in [1, MaxTokens 256], got 300"},
		{func(c *Config) { c.QueueSize = 0 }, "QueueSize must be > 0"},
		{func(c *Config) { c.ReadTimeout = 0 }, "ReadTimeout must be > 0"},
		{func(c *Config) { c.ShutdownTimeout = -1 }, "ShutdownTimeout must be > 0"},
	}
	for _, tc := range cases {
		cfg := DefaultConfig()
		tc.edit(&cfg)
		require.ErrorContains(t, cfg.Validate(), tc.want)
		_, err := newServer(nil, nil, cfg)
		require.ErrorContains(t, err, tc.want)
	}
}

// Two adapters may not share a name.
func TestDuplicateAdapterName(t *testing.T) {
	fixture(t) // saves the adapters
	_, err := load("", "", []adapterSpec{{name: loraA, dir: filepath.Join(fixtureDir, loraA)}, {name: loraA, dir: filepath.Join(fixtureDir, loraB)}}, DefaultConfig())
	require.ErrorContains(t, err, `the name "lora-a" is already served`)
}

// One engine call with rows of both LoRA adapters, the base and prompt tuning, prompts of
// different lengths and options of their own, gives every row the ids of its model alone: the
// slotted rows run as one mixed batch, prompt tuning's as a batch of its own.
func TestEngineMixesAdaptersInOneBatch(t *testing.T) {
	eng, text := fixture(t)
	require.GreaterOrEqual(t, eng.maxBatch(), 4)
	require.Equal(t, map[string]string{baseName: "", loraA: loraA, loraB: loraB}, eng.inSlots, "the LoRA adapters sit in slots")
	stories := []string{storyPrompt, "The cat", "One day, a little dog named Max", "Lily"}
	models := []string{loraA, baseName, loraB, promptTune}
	reqs := make([]request, len(models))
	for i, name := range models {
		prompt, err := text.encode(stories[i])
		require.NoError(t, err)
		cfg := generate.Config{MaxNewTokens: 6 + i, StopIDs: text.stopIDs}
		if i%2 == 1 {
			cfg.Temperature, cfg.Seed = 0.8, uint64(i)
		}
		reqs[i] = request{ctx: context.Background(), model: name, prompt: prompt, cfg: cfg}
	}
	got := make([][]int, len(reqs))
	errs := eng.generate(reqs, func(row, id int) bool { got[row] = append(got[row], id); return true })
	for i, r := range reqs {
		require.NoError(t, errs[i], models[i])
		want, err := generate.Generate(aloneModel(t, r.model), r.prompt, r.cfg)
		require.NoError(t, err)
		require.Equal(t, want, got[i], "row %d (%s)", i, r.model)
	}
}
