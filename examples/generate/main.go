// Command generate continues a prompt with a Llama model in Hugging Face format, optionally with
// a fine-tuning method's saved state applied (a folder written by peft.Model.Save).
//
//	go run ./examples/generate -prompt "Once upon a time" -max-new-tokens 32
//	go run ./examples/generate -model DIR -prompt TEXT -max-new-tokens N [-adapter DIR] [-json]
//
// Without -model it uses the embedded stories260K model. Decoding is greedy unless -temperature
// is > 0. With -json the last line of stdout is one JSON object:
//
//	{"prompt_ids": [...], "generated_ids": [...], "text": "...", "prompt_mean_nll": x}
//
// where text is the decoded prompt and continuation (special tokens skipped) and prompt_mean_nll
// is the mean next-token negative log-likelihood (natural log) of the prompt ids under teacher
// forcing, with the method applied (0 for a one-token prompt, which has no pair to score).
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io/fs"
	"os"
	"slices"

	"github.com/gomlx/gomlx/pkg/core/shapes"
	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/gomlx/gopjrt/dtypes"

	"peft/peft"
	"peft/peft/backend"
	"peft/peft/generate"
	"peft/peft/llama"
	"peft/peft/methods"
	"peft/peft/stories260k"
	"peft/peft/tokenizer"
)

// result is the -json output.
type result struct {
	PromptIDs     []int   `json:"prompt_ids"`
	GeneratedIDs  []int   `json:"generated_ids"`
	Text          string  `json:"text"`
	PromptMeanNLL float64 `json:"prompt_mean_nll"`
}

func main() {
	modelDir := flag.String("model", "", "Hugging Face Llama folder (default: the embedded stories260K)")
	prompt := flag.String("prompt", "", "text to continue (the tokenizer adds <s>)")
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
	if err := run(*modelDir, *prompt, *maxNew, *adapterDir, *asJSON, generate.Config{
		MaxNewTokens: *maxNew, Temperature: *temperature, TopK: *topK, TopP: *topP, Seed: *seed,
	}); err != nil {
		fmt.Fprintln(os.Stderr, "generate:", err)
		os.Exit(1)
	}
}

// loadOptions are passed to Model.Load (-allow-other-base).
var loadOptions []peft.LoadOption

func run(modelDir, prompt string, maxNew int, adapterDir string, asJSON bool, genCfg generate.Config) error {
	b, err := backend.Get()
	if err != nil {
		return err
	}
	if !asJSON {
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

	promptIDs := tok.Encode(prompt)
	// Stop at any of the model's end-of-sequence ids (Llama 3 has several), or the tokenizer's.
	genCfg.StopIDs = append([]int{}, cfg.EOSTokenIDs...)
	if eos := tok.EOS(); eos >= 0 && !slices.Contains(genCfg.StopIDs, eos) {
		genCfg.StopIDs = append(genCfg.StopIDs, eos)
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
		PromptIDs: promptIDs, GeneratedIDs: generated,
		Text:          tok.Decode(append(append([]int{}, promptIDs...), generated...), true),
		PromptMeanNLL: nll,
	}
	if asJSON {
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
