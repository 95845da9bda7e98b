// Command finetune fine-tunes a real pretrained model, the embedded stories260K (a 260K-parameter
// Llama trained on TinyStories), with every method of the SDK (LoRA, bottleneck adapters, prompt
// tuning and full fine-tuning) on two tasks, and prints a table per task:
//
//   - lm: language modelling. Stories in an invented style that TinyStories never had ("Once upon
//     a time, a zorblat named Quix lived in the glimmerwood. Every moonrise, Quix would flonk the
//     fizzy grumbleberry. …", generated in code by experiment.ZorblatStories) are tokenized with
//     the model's own tokenizer and packed into 4×64-token batches. Each method starts from a
//     fresh copy of the pretrained weights; the table shows the held-out next-token loss before
//     and after training, and the greedy continuation of "Once upon a time," is printed before
//     and after, so you can read whether the model picked up the new style.
//   - classify: the sentiment task of package reviews (short product reviews, positive or
//     negative), tokenized with the stories260K tokenizer, read by llama.Classifier with a new
//     2-class "score" head. Each method is run twice on the same batches: from the pretrained
//     weights and from random weights (the same architecture, llama.Init), with the held-out
//     accuracy measured at a quarter, half, three quarters and the end of training.
//
// It writes the smoothed training-loss curves as lm_loss.png (all methods) and classify_loss.png
// (pretrained against random start) in -out.
//
//	go run ./examples/finetune                       # both tasks: 20 s on 2 cores with OpenBLAS (70 s without)
//	go run ./examples/finetune -task lm -methods lora,full -steps 100
//	go run ./examples/finetune -task classify -classify-methods all -out /tmp
//
// Method names: full, lora (r=8 on q_proj and v_proj), lora-all-linear, dora (lora's settings
// with DoRA), adalora, ia3, adapter-pfeiffer, adapter-houlsby, prompt-tuning (10 virtual tokens),
// prefix-tuning (10, through PEFT's MLP); "all" selects every one.
package main

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"peft/peft"
	"peft/peft/backend"
	"peft/peft/experiment"
	"peft/peft/plot"
	"peft/peft/reviews"
)

// The sizes of the two tasks: small enough that the default run takes a few minutes on 2 cores
// with the pure-Go backend.
const (
	lmBatch, lmSeqLen     = 4, 64
	lmTrainStories        = 400 // ~290 batches: no story is seen twice in the default run
	lmEvalStories         = 8
	lmPrompt              = "Once upon a time,"
	lmSampleTokens        = 48
	clsBatch              = 8
	clsTrainReviews       = 2048
	clsEvalReviews        = 96
	clsTarget             = 0.9 // the accuracy the "steps to" column looks for
	dataSeed, heldOutSeed = 1, 1001
	headSeed              = 7
)

func main() {
	task := flag.String("task", "both", "which task to run: lm, classify or both")
	steps := flag.Int("steps", 50, "training steps per run")
	methods := flag.String("methods", "all", "comma-separated methods for the lm task, or all")
	clsMethods := flag.String("classify-methods", "full,lora", "comma-separated methods for the classify task "+
		"(each runs from pretrained and from random weights), or all")
	out := flag.String("out", ".", "folder for the PNG loss plots")
	verbose := flag.Bool("v", false, "show training progress")
	flag.Parse()
	if err := run(*task, *steps, *methods, *clsMethods, *out, *verbose); err != nil {
		fmt.Fprintln(os.Stderr, "finetune:", err)
		os.Exit(1)
	}
}

func run(task string, steps int, methods, clsMethods, out string, verbose bool) error {
	if task != "lm" && task != "classify" && task != "both" {
		return fmt.Errorf("-task must be lm, classify or both, not %q", task)
	}
	if steps < 4 {
		return fmt.Errorf("-steps must be at least 4, got %d", steps)
	}
	lmCands, err := selectCandidates(experiment.LMCandidates(), methods)
	if err != nil {
		return fmt.Errorf("-methods: %w", err)
	}
	clsCands, err := selectCandidates(experiment.Candidates(), clsMethods)
	if err != nil {
		return fmt.Errorf("-classify-methods: %w", err)
	}
	if err := os.MkdirAll(out, 0o755); err != nil {
		return err
	}
	b, err := backend.Get()
	if err != nil {
		return err
	}
	fmt.Println(backend.Description())
	p, err := experiment.LoadStories260K(b)
	if err != nil {
		return err
	}
	fmt.Printf("model: %s (%d layers, hidden %d, vocabulary %d)\n", p.Name, p.Config.NumLayers, p.Config.HiddenSize, p.Config.VocabSize)
	opts := experiment.RunOptions{Steps: steps, Seed: headSeed, Progress: peft.ProgressOff}
	if verbose {
		opts.Progress, opts.Output = peft.ProgressAuto, os.Stdout
	}

	start := time.Now()
	var plots []string
	if task != "classify" {
		path, err := languageModelling(p, lmCands, opts, out)
		if err != nil {
			return err
		}
		plots = append(plots, path)
	}
	if task != "lm" {
		path, err := classification(p, clsCands, opts, out)
		if err != nil {
			return err
		}
		plots = append(plots, path)
	}
	fmt.Printf("\ntotal time %s\n", time.Since(start).Round(time.Second))
	for _, path := range plots {
		fmt.Println("wrote", path)
	}
	return nil
}

// languageModelling teaches the pretrained model the zorblat style with each method and
// returns the path of the loss plot.
func languageModelling(p *experiment.Pretrained, cands []experiment.Candidate, opts experiment.RunOptions, out string) (string, error) {
	texts := experiment.ZorblatStories(lmTrainStories, dataSeed)
	train, err := experiment.LMBatches(p.Tokenizer, texts, lmBatch, lmSeqLen)
	if err != nil {
		return "", err
	}
	eval, err := experiment.LMBatches(p.Tokenizer, experiment.ZorblatStories(lmEvalStories, heldOutSeed), lmBatch, lmSeqLen)
	if err != nil {
		return "", err
	}
	fmt.Printf("\n== language modelling: a new style ==\n%d training batches of %d×%d tokens, %d held-out batches (other seed); a training story:\n  %s\n",
		len(train), lmBatch, lmSeqLen, len(eval), texts[0])
	opts.Prompt, opts.SampleTokens = lmPrompt, lmSampleTokens
	var results []*experiment.RunResult
	for _, c := range cands {
		method, err := c.New(opts.Steps)
		if err != nil {
			return "", err
		}
		opts.LearningRate = c.LearningRate
		fmt.Printf("\n%s: %d steps at lr %g…\n", c.Name, opts.Steps, c.LearningRate)
		t0 := time.Now()
		r, err := p.FineTuneLM(c.Name, method, train, eval, opts)
		if err != nil {
			return "", err
		}
		fmt.Printf("  held-out loss %.4f → %.4f (%s)\n  before: %q\n  after:  %q\n",
			r.LossBefore, r.LossAfter, time.Since(t0).Round(100*time.Millisecond), r.SampleBefore, r.SampleAfter)
		results = append(results, r)
	}
	fmt.Printf("\nlanguage modelling, %d steps per method (loss: held-out next-token cross-entropy, nats):\n\n", opts.Steps)
	if err := experiment.WriteLMTable(os.Stdout, results); err != nil {
		return "", err
	}
	chart := plot.Chart{Title: "stories260K learning the zorblat style: training loss", XLabel: "step",
		YLabel: "next-token loss (smoothed)", Smooth: smoothing(opts.Steps)}
	for _, r := range results {
		chart.Series = append(chart.Series, plot.Series{Name: r.Method, Values: r.Losses})
	}
	path := filepath.Join(out, "lm_loss.png")
	return path, chart.WritePNG(path)
}

// classification trains the sentiment classifier with each method from the pretrained and from
// random weights and returns the path of the loss plot.
func classification(p *experiment.Pretrained, cands []experiment.Candidate, opts experiment.RunOptions, out string) (string, error) {
	trainData := reviews.Generate(clsTrainReviews, dataSeed)
	evalData := reviews.Generate(clsEvalReviews, heldOutSeed)
	seqLen := max(experiment.MaxReviewTokens(p.Tokenizer, trainData), experiment.MaxReviewTokens(p.Tokenizer, evalData))
	seqLen = (seqLen + 7) / 8 * 8
	train, err := experiment.ReviewBatches(p.Tokenizer, trainData, clsBatch, seqLen)
	if err != nil {
		return "", err
	}
	eval, err := experiment.ReviewBatches(p.Tokenizer, evalData, clsBatch, seqLen)
	if err != nil {
		return "", err
	}
	positive := 0
	for _, r := range evalData[:len(eval)*clsBatch] {
		if r.Positive {
			positive++
		}
	}
	majority := float64(max(positive, len(eval)*clsBatch-positive)) / float64(len(eval)*clsBatch)
	fmt.Printf("\n== classification: sentiment, pretrained against random start ==\n"+
		"%d training batches of %d reviews × %d tokens, e.g. %q (positive: %v)\n"+
		"%d held-out reviews (other seed), %d positive: always answering the majority class scores %.3f\n",
		len(train), clsBatch, seqLen, trainData[0].Text, trainData[0].Positive, len(eval)*clsBatch, positive, majority)
	opts.Checkpoints = []int{opts.Steps / 4, opts.Steps / 2, 3 * opts.Steps / 4}
	var results []*experiment.RunResult
	for _, c := range cands {
		for _, random := range []bool{false, true} {
			method, err := c.New(opts.Steps)
			if err != nil {
				return "", err
			}
			opts.LearningRate, opts.RandomInit = c.LearningRate, random
			t0 := time.Now()
			r, err := p.FineTuneClassifier(c.Name, method, train, eval, opts)
			if err != nil {
				return "", err
			}
			fmt.Printf("%s from %s weights, %d steps at lr %g: held-out accuracy %.3f → %.3f, loss %.4f → %.4f (%s)\n",
				c.Name, r.Start, opts.Steps, c.LearningRate, r.AccuracyBefore, r.Accuracy, r.LossBefore, r.LossAfter,
				time.Since(t0).Round(100*time.Millisecond))
			results = append(results, r)
		}
	}
	fmt.Printf("\nclassification, %d steps per run (loss: held-out cross-entropy; acc@N: held-out accuracy after N steps):\n\n", opts.Steps)
	if err := experiment.WriteClassifyTable(os.Stdout, results, clsTarget); err != nil {
		return "", err
	}
	chart := plot.Chart{Title: "stories260K sentiment classifier: pretrained vs random start, training loss",
		XLabel: "step", YLabel: "cross-entropy (smoothed)", Smooth: max(1, opts.Steps/6)}
	for _, r := range results {
		chart.Series = append(chart.Series, plot.Series{Name: r.Method + " (" + r.Start + ")", Values: r.Losses})
	}
	path := filepath.Join(out, "classify_loss.png")
	return path, chart.WritePNG(path)
}

// selectCandidates keeps the candidates named in list (comma-separated, in the candidates'
// order; "all" keeps every one). An unknown name is an error that lists the known ones.
func selectCandidates(cands []experiment.Candidate, list string) ([]experiment.Candidate, error) {
	if strings.TrimSpace(list) == "all" {
		return cands, nil
	}
	var known []string
	for _, c := range cands {
		known = append(known, c.Name)
	}
	var wanted []string
	for _, name := range strings.Split(list, ",") {
		if name = strings.TrimSpace(name); name == "" {
			continue
		}
		if !slices.Contains(known, name) {
			return nil, fmt.Errorf("unknown method %q (known: %s, or all)", name, strings.Join(known, ", "))
		}
		wanted = append(wanted, name)
	}
	if len(wanted) == 0 {
		return nil, fmt.Errorf("no method named (known: %s, or all)", strings.Join(known, ", "))
	}
	var out []experiment.Candidate
	for _, c := range cands {
		if slices.Contains(wanted, c.Name) {
			out = append(out, c)
		}
	}
	return out, nil
}

// smoothing is the moving-average window of the language-modelling loss plot: about a twentieth
// of the run. (Classification, whose batches of 8 reviews give noisier losses, uses a sixth.)
func smoothing(steps int) int { return max(1, steps/20) }
