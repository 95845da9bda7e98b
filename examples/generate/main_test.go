package main

import (
	"encoding/json"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/stretchr/testify/require"

	"peft/lora"
	"peft/peft/chat"
	"peft/peft/generate"
	"peft/peft/llama"
	"peft/peft/pefttest"
	"peft/peft/stories260k"
	"peft/peft/tokenizer"
)

// runJSON runs the program on the embedded model with -json and decodes the last line of its
// stdout.
func runJSON(t *testing.T, adapterDir string) result {
	t.Helper()
	return runOptions(t, options{prompt: "Once upon a time", adapterDir: adapterDir, generate: generate.Config{MaxNewTokens: 16}})
}

// runOptions runs the program with o and -json and decodes the last line of its stdout.
func runOptions(t *testing.T, o options) result {
	t.Helper()
	o.asJSON = true
	r, w, err := os.Pipe()
	require.NoError(t, err)
	stdout := os.Stdout
	os.Stdout = w
	runErr := run(o)
	os.Stdout = stdout
	require.NoError(t, w.Close())
	out, err := io.ReadAll(r)
	require.NoError(t, err)
	require.NoError(t, runErr)
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	var res result
	require.NoError(t, json.Unmarshal([]byte(lines[len(lines)-1]), &res), "last line: %q", lines[len(lines)-1])
	return res
}

// The JSON contract on the embedded stories260K: golden prompt ids, golden greedy continuation
// (golden.json's greedy16_text), and the prompt's mean NLL.
func TestJSONContract(t *testing.T) {
	res := runJSON(t, "")
	require.Equal(t, []int{1, 403, 407, 261, 378}, res.PromptIDs)
	require.Equal(t, []int{432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337}, res.GeneratedIDs)
	require.Equal(t, "Once upon a time, there was a little girl named Lily. She loved to play", res.Text)
	require.InDelta(t, 0.0685, res.PromptMeanNLL, 1e-3)
}

// With -adapter the saved method is applied: a LoRA whose B is not zero changes the prompt's NLL.
func TestAdapter(t *testing.T) {
	method, err := lora.New(lora.DefaultConfig())
	require.NoError(t, err)
	_, m := pefttest.StoriesModel(t, method)
	pefttest.SetRandomB(t, m, 1, 0.2)
	dir := t.TempDir()
	require.NoError(t, m.Save(dir))
	res := runJSON(t, dir)
	require.Equal(t, []int{1, 403, 407, 261, 378}, res.PromptIDs)
	want, err := generate.MeanNLL(m, res.PromptIDs)
	require.NoError(t, err)
	require.InDelta(t, want, res.PromptMeanNLL, 1e-9)
	require.Greater(t, res.PromptMeanNLL-0.0685, 0.01, "the adapter must change the model")

	// The same adapter as Hugging Face PEFT writes it (no record of ours in the metadata), in a
	// sub-folder as PEFT keeps adapters not named "default": -adapter names the parent folder.
	parent := t.TempDir()
	pefttest.WritePlainPEFT(t, dir, filepath.Join(parent, "my-task"))
	res = runJSON(t, parent)
	require.InDelta(t, want, res.PromptMeanNLL, 1e-9)
}

// -model works on every family peft/llama reads, with the family's own tokenizer and chat
// template: a random checkpoint of each family's tiny fixture (peft/llama/testdata/families,
// whose logits are checked against an independent reference there) with the vocabulary of a
// byte-level tokenizer fixture, saved with SaveHF. Without -chat the prompt is the tokenizer's
// encoding of the text; with -chat it is the template's one user turn, generation stops at the
// template's end-of-turn token, and the JSON agrees with the model loaded here.
func TestEveryFamily(t *testing.T) {
	families := []struct {
		fixture, tokenizer, template, eos string
	}{
		{"llama3", "bytelevel/llama3.json", "llama3.2", "<|eot_id|>"},
		{"llama_linear_bias", "bytelevel/smollm2.json", "smollm2", "<|im_end|>"},
		{"qwen2", "bytelevel/qwen2.json", "qwen2.5", "<|im_end|>"},
		{"qwen3", "bytelevel/qwen2.json", "qwen3", "<|im_end|>"},
		{"mistral", "", "mistral", "</s>"}, // stories260K's SentencePiece-style tokenizer
	}
	const prompt = "Hello, who are you? 🙂"
	for _, f := range families {
		t.Run(f.fixture, func(t *testing.T) {
			dir, tok := familyFolder(t, f.fixture, f.tokenizer, f.template, f.eos)
			plain := runOptions(t, options{modelDir: dir, prompt: prompt, generate: generate.Config{MaxNewTokens: 6}})
			require.Equal(t, prompt, plain.PromptText)
			require.Equal(t, tok.Encode(prompt), plain.PromptIDs)
			checkAgainstModel(t, dir, tok, plain, 6, nil)

			chatted := runOptions(t, options{modelDir: dir, prompt: prompt, chat: true, generate: generate.Config{MaxNewTokens: 6}})
			tmpl, err := chat.Load(dir)
			require.NoError(t, err)
			want, err := tmpl.Render([]chat.Message{{Role: "user", Content: prompt}}, chat.Options{AddGenerationPrompt: true})
			require.NoError(t, err)
			require.Equal(t, want, chatted.PromptText)
			require.Contains(t, chatted.PromptText, prompt)
			require.Equal(t, tok.EncodeNoSpecial(want), chatted.PromptIDs)
			eos, ok := tok.TokenID(f.eos)
			require.True(t, ok)
			checkAgainstModel(t, dir, tok, chatted, 6, []int{eos})
		})
	}
}

// familyFolder writes a model folder of the family fixture with the given tokenizer (""
// means stories260K's) and chat template from peft/chat's fixtures.
func familyFolder(t *testing.T, fixture, tokFile, template, eos string) (string, *tokenizer.Tokenizer) {
	t.Helper()
	tokPath := filepath.Join("..", "..", "peft", "tokenizer", "testdata", tokFile)
	var tokData []byte
	var err error
	if tokFile == "" {
		tokData, err = fs.ReadFile(stories260k.FS(), "tokenizer.json")
	} else {
		tokData, err = os.ReadFile(tokPath)
	}
	require.NoError(t, err)
	tok, err := tokenizer.Parse(tokData)
	require.NoError(t, err)
	configData, err := os.ReadFile(filepath.Join("..", "..", "peft", "llama", "testdata", "families", fixture, "config.json"))
	require.NoError(t, err)
	cfg, err := llama.ParseConfig(configData)
	require.NoError(t, err)
	cfg.VocabSize = tok.VocabSize()
	cfg.MaxPositions = 256 // room for a chat template's system prompt
	eosID, ok := tok.TokenID(eos)
	require.True(t, ok, eos)
	cfg.EOSTokenIDs = llama.TokenIDs{eosID}
	ctx := context.New()
	require.NoError(t, llama.Init(ctx, cfg, 0, 7))
	dir := t.TempDir()
	require.NoError(t, llama.SaveHF(dir, cfg, ctx, nil))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "tokenizer.json"), tokData, 0o644))
	src, err := os.ReadFile(filepath.Join("..", "..", "peft", "chat", "testdata", "templates", template+".jinja"))
	require.NoError(t, err)
	config, err := json.Marshal(map[string]any{"chat_template": string(src), "eos_token": eos, "bos_token": tok.IDToken(max(tok.BOS(), 0))})
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(dir, "tokenizer_config.json"), config, 0o644))
	return dir, tok
}

// checkAgainstModel loads the folder here and requires the JSON's greedy ids and prompt NLL to
// be that model's, and its text their decoding; generation stops early only at a stop id.
func checkAgainstModel(t *testing.T, dir string, tok *tokenizer.Tokenizer, res result, maxNew int, stop []int) {
	t.Helper()
	cfg, m := pefttest.FolderModel(t, os.DirFS(dir), nil, 1)
	want, err := generate.Generate(m, res.PromptIDs, generate.Config{MaxNewTokens: maxNew, StopIDs: append(cfg.EOSTokenIDs, stop...)})
	require.NoError(t, err)
	require.Equal(t, want, res.GeneratedIDs)
	nll, err := generate.MeanNLL(m, res.PromptIDs)
	require.NoError(t, err)
	require.InDelta(t, nll, res.PromptMeanNLL, 1e-9)
	require.Greater(t, res.PromptMeanNLL, 0.0)
	require.Equal(t, tok.Decode(append(append([]int{}, res.PromptIDs...), res.GeneratedIDs...), true), res.Text)
}
