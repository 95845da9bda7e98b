// Command generate continues a prompt with a model in Hugging Face format (of any family
// peft/llama reads: Llama 1–3.x, Mistral, Qwen2/2.5, Qwen3, SmolLM2, ...), optionally with a
// fine-tuning method's saved state applied (a Hugging Face PEFT folder, or peft.Model.Save's).
//
//	go run ./examples/generate -prompt "Once upon a time" -max-new-tokens 32
//	go run ./examples/generate -model DIR -prompt TEXT -max-new-tokens N [-chat] [-adapter DIR] [-json]
//
// Without -model it uses the embedded stories260K model. With -chat the prompt is one user turn
// formatted with the model's chat template (tokenizer_config.json or chat_template.jinja, see
// package peft/chat) ending with the assistant's header, tokenized as the template writes it (no
// BOS added beyond the template's); without, the tokenizer encodes the prompt as it is, adding
// what its post-processor adds (Llama's <s>). Generation stops at the model's end-of-sequence
// ids (config.json's eos_token_id, which may be a list), the tokenizer's </s>, and with -chat the
// template's eos_token. Decoding is greedy unless -temperature is > 0. With -json the last line
// of stdout is one JSON object:
//
//	{"prompt_text": "...", "prompt_ids": [...], "generated_ids": [...], "text": "...", "prompt_mean_nll": x}
//
// where prompt_text is what was tokenized (the formatted conversation with -chat), text is the
// decoded prompt and continuation (special tokens skipped) and prompt_mean_nll
// is the mean next-token negative log-likelihood (natural log) of the prompt ids under teacher
// forcing, with the method applied (0 for a one-token prompt, which has no pair to score).
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"os"
	"slices"
	"strings"

	"github.com/gomlx/gomlx/pkg/core/shapes"
	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/gomlx/gopjrt/dtypes"

	"peft/peft"
	"peft/peft/backend"
	"peft/peft/chat"
	"peft/peft/generate"
	"peft/peft/llama"
	"peft/peft/methods"
	"peft/peft/stories260k"
	"peft/peft/tokenizer"
)

// result is the -json output.
type result struct {
	PromptText    string  `json:"prompt_text"`
	PromptIDs     []int   `json:"prompt_ids"`
	GeneratedIDs  []int   `json:"generated_ids"`
	Text          string  `json:"text"`
	PromptMeanNLL float64 `json:"prompt_mean_nll"`
}

func main() {
	modelDir := flag.String("model", "", "Hugging Face model folder (default: the embedded stories260K)")
	prompt := flag.String("prompt", "", "text to continue (the tokenizer adds what its post-processor adds, Llama's <s>)")
	asChat := flag.Bool("chat", false, "format the prompt as one user turn with the model's chat template")
	maxNew := flag.Int("max-new-tokens", 64, "number of tokens to generate at most")
	adapterDir := flag.String("adapter", "", "saved adapter to apply: a Hugging Face PEFT folder (from this SDK or PEFT) or this SDK's layout")
	asJSON := flag.Bool("json", false, "print one JSON object on the last line of stdout")
	temperature := flag.Float64("temperature", 0, "sampling temperature (0: greedy)")
	topK := flag.Int("top-k", 0, "sample among the k most likely tokens (0: off)")
	topP := flag.Float64("top-p", 0, "sample among the most likely tokens whose probabilities sum to p (0: off)")
	seed := flag.Uint64("seed", 0, "sampling seed")
	allowOtherBase := flag.Bool("allow-other-base", false, "apply the adapter even if it was saved on a base model with other weights")
	flag.Parse()
	if *allowOtherBase {
		loadOptions = append(loadOptions, peft.AllowOtherBase())
	}
	if err := run(options{
		modelDir: *modelDir, prompt: *prompt, adapterDir: *adapterDir, asJSON: *asJSON, chat: *asChat,
		generate: generate.Config{MaxNewTokens: *maxNew, Temperature: *temperature, TopK: *topK, TopP: *topP, Seed: *seed},
	}); err != nil {
		// Say it in the command's words: its flags, one "generate:" prefix.
		msg := strings.ReplaceAll(err.Error(), "MaxNewTokens", "-max-new-tokens")
		fmt.Fprintln(os.Stderr, "generate:", strings.TrimPrefix(msg, "generate: "))
		os.Exit(1)
	}
}

// loadOptions are passed to Model.Load (-allow-other-base).
var loadOptions []peft.LoadOption

// options are the command line's.
type options struct {
	modelDir, prompt, adapterDir string
	asJSON, chat                 bool
	generate                     generate.Config
}

func run(o options) error {
	modelDir, adapterDir, genCfg := o.modelDir, o.adapterDir, o.generate
	b, err := backend.Get()
	if err != nil {
		return err
	}
	if !o.asJSON {
		fmt.Println(backend.Description())
	}
	fsys, name := stories260k.FS(), stories260k.Name
	if modelDir != "" {
		fsys, name = os.DirFS(modelDir), modelDir
	}
	tokData, err := fs.ReadFile(fsys, "tokenizer.json")
	if err != nil {
		return fmt.Errorf("model %s: %w", name, err)
	}
	tok, err := tokenizer.Parse(tokData)
	if err != nil {
		return fmt.Errorf("model %s: %w", name, err)
	}
	ctx := context.New()
	cfg, err := llama.LoadPretrainedFS(ctx, fsys)
	if err != nil {
		return fmt.Errorf("model %s: %w", name, err)
	}
	peft.NameBaseModel(ctx, name)
	var method peft.Method
	if adapterDir != "" {
		if method, err = methods.FromSaved(adapterDir); err != nil {
			return err
		}
	}
	m, err := peft.NewModel(b, ctx, llama.CausalLM(cfg), method, shapes.Make(dtypes.Int32, 1, 1))
	if err != nil {
		return err
	}
	if method != nil {
		if err := m.Load(adapterDir, loadOptions...); err != nil {
			return err
		}
	}

	// Stop at any of the model's end-of-sequence ids (Llama 3 has several), or the tokenizer's.
	genCfg.StopIDs = append([]int{}, cfg.EOSTokenIDs...)
	stopAt := func(id int) {
		if id >= 0 && !slices.Contains(genCfg.StopIDs, id) {
			genCfg.StopIDs = append(genCfg.StopIDs, id)
		}
	}
	stopAt(tok.EOS())
	promptText, promptIDs := o.prompt, tok.Encode(o.prompt)
	if o.chat {
		tmpl, err := chat.LoadFS(fsys)
		if err != nil {
			return fmt.Errorf("model %s: %w", name, err)
		}
		promptText, err = tmpl.Render([]chat.Message{{Role: "user", Content: o.prompt}}, chat.Options{AddGenerationPrompt: true})
		if err != nil {
			return fmt.Errorf("model %s: %w", name, err)
		}
		promptIDs = tok.EncodeNoSpecial(promptText)
		if id, ok := tok.TokenID(tmpl.SpecialToken("eos_token")); ok {
			stopAt(id) // the end of an assistant turn: <|eot_id|>, <|im_end|>
		}
	}
	if len(promptIDs) == 0 {
		return errors.New("the prompt has no tokens: give -prompt")
	}
	for _, id := range promptIDs {
		if id >= cfg.VocabSize {
			return fmt.Errorf("model %s: the tokenizer gives id %d (%q), beyond the model's vocab_size %d: tokenizer.json is not this model's", name, id, tok.IDToken(id), cfg.VocabSize)
		}
	}
	generated, err := generate.Generate(m, promptIDs, genCfg)
	if err != nil {
		return err
	}
	nll, err := generate.MeanNLL(m, promptIDs)
	if err != nil {
		return err
	}
	r := result{
		PromptText: promptText, PromptIDs: promptIDs, GeneratedIDs: generated,
		Text:          tok.Decode(append(append([]int{}, promptIDs...), generated...), true),
		PromptMeanNLL: nll,
	}
	if o.asJSON {
		out, err := json.Marshal(r)
		if err != nil {
			return err
		}
		fmt.Println(string(out))
		return nil
	}
	what := "base model"
	if method != nil {
		what = method.Name() + " from " + adapterDir
	}
	fmt.Printf("model: %s (%s), %s\n", name, what, m.Report())
	fmt.Printf("prompt ids: %v (mean next-token NLL %.4f)\ngenerated ids: %v\n\n%s\n", promptIDs, nll, generated, r.Text)
	return nil
}
