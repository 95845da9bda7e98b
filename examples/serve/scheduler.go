package main

import (
	"errors"
	"slices"
	"strings"
	"sync"
	"unicode/utf8"
)

// errShuttingDown ends the jobs still queued when the scheduler stops.
var errShuttingDown = errors.New("the server is shutting down")

// scheduler owns the engine: one goroutine takes jobs from a bounded queue and runs them,
// grouping up to engine.maxBatch() queued jobs (of any models) into one generate call.
type scheduler struct {
	eng   engine
	queue chan *job

	mu      sync.Mutex // guards stopped against submit racing stop
	stopped bool
	quit    chan struct{}
	done    chan struct{}
}

// newScheduler starts the scheduler's goroutine with a queue of queueSize jobs.
func newScheduler(eng engine, queueSize int) *scheduler {
	s := &scheduler{eng: eng, queue: make(chan *job, queueSize), quit: make(chan struct{}), done: make(chan struct{})}
	go s.loop()
	return s
}

// submit queues j, or returns false when the queue is full or the scheduler stopped.
func (s *scheduler) submit(j *job) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopped {
		return false
	}
	select {
	case s.queue <- j:
		return true
	default:
		return false
	}
}

// stop ends the scheduler after the batch it runs; jobs still queued end with errShuttingDown.
// It returns when the goroutine has.
func (s *scheduler) stop() {
	s.mu.Lock()
	if !s.stopped {
		s.stopped = true
		close(s.quit)
	}
	s.mu.Unlock()
	<-s.done
}

func (s *scheduler) loop() {
	defer close(s.done)
	for {
		select {
		case <-s.quit:
			for {
				select {
				case j := <-s.queue:
					j.finish(errShuttingDown)
				default:
					return
				}
			}
		case j := <-s.queue:
			batch := []*job{j}
		fill:
			for len(batch) < s.eng.maxBatch() {
				select {
				case j := <-s.queue:
					batch = append(batch, j)
				default:
					break fill
				}
			}
			s.run(batch)
		}
	}
}

// run generates batch, skipping the jobs whose request ended while they waited.
func (s *scheduler) run(batch []*job) {
	live := batch[:0]
	for _, j := range batch {
		if err := j.req.ctx.Err(); err != nil {
			j.finish(err)
			continue
		}
		live = append(live, j)
	}
	if len(live) == 0 {
		return
	}
	reqs := make([]request, len(live))
	for i, j := range live {
		reqs[i] = j.req
	}
	errs := s.eng.generate(reqs, func(row, id int) bool { return live[row].emit(id) })
	for i, j := range live {
		j.finish(errs[i])
	}
}

// job is one request on its way through the scheduler: it turns the ids the engine emits into
// text, ends the generation at a stop string, and hands the text to the HTTP handler as deltas
// on a channel that never blocks the scheduler (it holds one delta per id and a last one).
type job struct {
	req    request
	text   *textModel
	before string // the prompt's text, decoded
	stops  []string
	// deltas carries the text as it becomes final; closed when the job is done, after which the
	// fields below are the result.
	deltas chan string

	ids    []int
	sent   string // what was sent on deltas
	found  bool   // a stop string ended the text
	result string // the completion's text, the concatenation of the deltas
	reason string // "stop" or "length"
	err    error
}

func newJob(req request, text *textModel, stops []string) *job {
	return &job{req: req, text: text, before: text.decode(req.prompt), stops: stops, deltas: make(chan string, req.cfg.MaxNewTokens+1)}
}

// emit takes the next id and sends whatever text is now final; false ends the generation.
func (j *job) emit(id int) bool {
	j.ids = append(j.ids, id)
	full := j.continuation()
	if !j.found {
		// Hold back a broken UTF-8 sequence (a byte-fallback character half decoded) and a tail
		// that may begin a stop string.
		safe := strings.TrimRight(full, string(utf8.RuneError))
		safe = safe[:len(safe)-stopPrefix(safe, j.stops)]
		j.send(safe)
	}
	return !j.found && j.req.ctx.Err() == nil
}

// continuation is the text of the ids so far, cut before the first stop string (setting found).
func (j *job) continuation() string {
	full := j.text.continuation(j.before, j.req.prompt, j.ids)
	cut := -1
	for _, s := range j.stops {
		if i := strings.Index(full, s); i >= 0 && (cut < 0 || i < cut) {
			cut = i
		}
	}
	if cut >= 0 {
		j.found = true
		full = full[:cut]
	}
	return full
}

// send sends what text extends beyond what was sent.
func (j *job) send(text string) {
	if len(text) > len(j.sent) && strings.HasPrefix(text, j.sent) {
		j.deltas <- text[len(j.sent):]
		j.sent = text
	}
}

// finish sends the rest of the text and closes deltas; err is the engine's for this job.
func (j *job) finish(err error) {
	if err == nil && !j.found {
		err = j.req.ctx.Err()
	}
	j.err = err
	if err == nil {
		full := j.continuation()
		if rest, ok := strings.CutPrefix(full, j.sent); ok {
			if rest != "" {
				j.deltas <- rest
			}
			j.result = full
		} else { // a decoding that changed what it had given: keep what was sent
			j.result = j.sent
		}
		j.reason = "length"
		if j.found || len(j.ids) > 0 && slices.Contains(j.req.cfg.StopIDs, j.ids[len(j.ids)-1]) {
			j.reason = "stop"
		}
	}
	close(j.deltas)
}

// stopPrefix is the length of the longest suffix of text that is a proper prefix of a stop
// string.
func stopPrefix(text string, stops []string) int {
	longest := 0
	for _, s := range stops {
		for n := min(len(s)-1, len(text)); n > longest; n-- {
			if strings.HasSuffix(text, s[:n]) {
				longest = n
				break
			}
		}
	}
	return longest
}

// wait returns when j is done.
func (j *job) wait() {
	for range j.deltas {
	}
}
